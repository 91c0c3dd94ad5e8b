//! Peer certificate verification: Envoy's URL-encoded PEM in, a [`PeerIdentity`] or a
//! typed [`CertRejection`] out. Path validation is rustls-webpki's (client-auth usage,
//! configured anchors and intermediates, `now` passed in); x509-parser only reads fields
//! of a certificate that has already been verified.

use super::FormSlot;
use crate::spiffe::{SpiffeError, SpiffeId, TrustDomain};
use crate::config::PeerSettings;
use base64::Engine as _;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, TrustAnchor, UnixTime};
use std::path::Path;
use std::sync::Arc;
use x509_parser::extensions::GeneralName;
use x509_parser::prelude::{FromDer, X509Certificate};

/// Most intermediates accepted from configuration; webpki itself bounds path building.
const MAX_INTERMEDIATES: usize = 16;

/// Most certificates (leaf copies included) decoded from one request's certificate text,
/// before anything counts them as intermediates. `[peer] max_size` already bounds the
/// text; this bounds the list built from it.
const MAX_DECODED: usize = 64;

/// Why a presented certificate was not accepted.
#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
#[non_exhaustive]
pub enum CertRejection {
    /// Certificate is larger than `max` bytes.
    #[error("certificate is larger than {max} bytes")]
    TooLarge {
        /// `[peer] max_size`.
        max: usize,
    },
    /// Certificate is not URL-encoded PEM.
    #[error("certificate is not URL-encoded PEM")]
    Encoding,
    /// Not exactly one PEM certificate (how many were found is given).
    #[error("expected exactly one PEM certificate, found {0}")]
    Count(usize),
    /// The request brought `found` intermediate certificates, more than the `max` allowed (peer.max_request_intermediates).
    #[error(
        "the request brought {found} intermediate certificates, more than the {max} allowed (peer.max_request_intermediates)"
    )]
    TooManyIntermediates {
        /// How many the request brought.
        found: usize,
        /// `[peer] max_request_intermediates`.
        max: usize,
    },
    /// The certificate does not chain to a trusted CA (the reason is given).
    #[error("certificate does not chain to a trusted CA: {0}")]
    UnknownIssuer(String),
    /// Certificate has expired.
    #[error("certificate has expired")]
    Expired,
    /// Certificate is not yet valid.
    #[error("certificate is not yet valid")]
    NotYetValid,
    /// Certificate is not valid for client authentication.
    #[error("certificate is not valid for client authentication")]
    Usage,
    /// Certificate has been revoked (CRL).
    #[error("certificate has been revoked (CRL)")]
    Revoked,
    /// `x-forwarded-client-cert` could not be used (the reason is given).
    #[error("x-forwarded-client-cert: {0}")]
    Xfcc(String),
    /// A CA certificate was presented as the client certificate.
    #[error("a CA certificate was presented as the client certificate")]
    CaAsLeaf,
    /// The certificate was rejected by path validation (the reason is given).
    #[error("certificate rejected: {0}")]
    Invalid(String),
    /// A SPIFFE certificate without exactly one URI SAN (how many is given).
    #[error("SPIFFE certificate must carry exactly one URI SAN, found {0}")]
    SpiffeUriCount(usize),
    /// SPIFFE certificate must not be able to sign certificates or CRLs.
    #[error("SPIFFE certificate must not be able to sign certificates or CRLs")]
    SpiffeSigningLeaf,
    /// The SPIFFE ID is invalid.
    #[error("SPIFFE ID is invalid: {0}")]
    SpiffeId(SpiffeError),
    /// The trust domain (given) is not one of the configured trust domains.
    #[error("trust domain \"{0}\" is not one of the configured trust domains")]
    ForeignTrustDomain(String),
}

/// A certificate that verified, with the fields policies may use.
/// Only the peer verifier constructs one.
#[derive(Debug, Clone)]
pub struct PeerIdentity {
    spiffe_id: Option<SpiffeId>,
    uri_sans: Vec<String>,
    dns_sans: Vec<String>,
    email_sans: Vec<String>,
    subject: String,
    issuer: String,
    serial: String,
    not_before: i64,
    not_after: i64,
    sha256: [u8; 32],
    /// The certificate's Cedar form, built by the policy mapping on first use, replaced
    /// when policies that read a different part of it are loaded.
    derived: FormSlot,
}

impl PeerIdentity {
    /// The SPIFFE ID (the one URI SAN of a SPIFFE certificate), if it is one.
    pub fn spiffe_id(&self) -> Option<&SpiffeId> {
        self.spiffe_id.as_ref()
    }
    /// The URI subject alternative names.
    pub fn uri_sans(&self) -> &[String] {
        &self.uri_sans
    }
    /// The DNS subject alternative names.
    pub fn dns_sans(&self) -> &[String] {
        &self.dns_sans
    }
    /// The email subject alternative names.
    pub fn email_sans(&self) -> &[String] {
        &self.email_sans
    }
    /// The subject's distinguished name, as text.
    pub fn subject(&self) -> &str {
        &self.subject
    }
    /// The issuer's distinguished name, as text.
    pub fn issuer(&self) -> &str {
        &self.issuer
    }
    /// Serial number, lower-case hex.
    pub fn serial(&self) -> &str {
        &self.serial
    }
    /// Start of validity, in seconds since the Unix epoch.
    pub fn not_before(&self) -> i64 {
        self.not_before
    }
    /// End of validity, in seconds since the Unix epoch.
    pub fn not_after(&self) -> i64 {
        self.not_after
    }
    /// Where a later stage keeps the form it derives from this certificate.
    pub(crate) fn derived(&self) -> &FormSlot {
        &self.derived
    }
    /// SHA-256 of the DER certificate, base64url without padding: RFC 8705 `x5t#S256`.
    pub fn thumbprint(&self) -> String {
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(self.sha256)
    }
    /// The workload name: SPIFFE ID, else first DNS SAN that is a host name, else subject.
    /// SECURITY: a DNS SAN holding other text (say `spiffe://example.org/admin`) must not
    /// name a workload as if it were a verified SPIFFE ID.
    pub fn workload_id(&self) -> String {
        let host_name = |d: &&String| {
            !d.is_empty()
                && d.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'.' || b == b'*')
        };
        match (&self.spiffe_id, self.dns_sans.iter().find(host_name)) {
            (Some(id), _) => id.to_string(),
            (None, Some(dns)) => dns.clone(),
            (None, None) => self.subject.clone(),
        }
    }
}

impl PeerIdentity {
    /// A certificate identity as a policy test case states it, with no certificate behind
    /// it. Only `portcullis test` builds these.
    pub(crate) fn for_policy_test(
        spiffe_id: Option<SpiffeId>,
        dns_sans: Vec<String>,
        subject: String,
        issuer: String,
    ) -> PeerIdentity {
        PeerIdentity {
            uri_sans: spiffe_id.iter().map(ToString::to_string).collect(),
            spiffe_id,
            dns_sans,
            email_sans: Vec::new(),
            subject,
            issuer,
            serial: String::new(),
            not_before: 0,
            not_after: i64::MAX,
            sha256: [0; 32],
            derived: FormSlot::default(),
        }
    }
}

/// A verified certificate path, remembered by the digest of its DER certificates.
struct CachedPeer {
    identity: Arc<PeerIdentity>,
    /// The verdict holds while `now` is in this window: the latest `notBefore` and the
    /// earliest `notAfter` of every certificate given, and the earliest CRL `nextUpdate`.
    valid_from: i64,
    valid_until: i64,
}

/// Verifies client certificates against the configured trust material. A reload builds a
/// new verifier, so the cache of verified certificates never outlives the trust bundle,
/// intermediates and CRLs it was verified against.
pub struct PeerVerifier {
    anchors: Vec<TrustAnchor<'static>>,
    intermediates: Vec<CertificateDer<'static>>,
    crls: Vec<webpki::CertRevocationList<'static>>,
    trust_domains: Vec<TrustDomain>,
    max_size: usize,
    /// `[peer] max_request_intermediates`: most intermediates one request may bring.
    max_request_intermediates: usize,
    /// The window of the configured material: configured intermediates and CRLs.
    material_from: i64,
    material_until: i64,
    cache: Option<quick_cache::sync::Cache<[u8; 32], Arc<CachedPeer>>>,
}

impl std::fmt::Debug for PeerVerifier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PeerVerifier")
            .field("anchors", &self.anchors.len())
            .field("intermediates", &self.intermediates.len())
            .field("crls", &self.crls.len())
            .field("cached", &self.cache.as_ref().map_or(0, |c| c.len()))
            .finish_non_exhaustive()
    }
}

/// SHA-256 over length-prefixed parts, so that different splits of the same bytes differ.
fn digest<'a>(parts: impl IntoIterator<Item = &'a [u8]>) -> [u8; 32] {
    let mut digest = aws_lc_rs::digest::Context::new(&aws_lc_rs::digest::SHA256);
    for part in parts {
        digest.update(&(part.len() as u64).to_be_bytes());
        digest.update(part);
    }
    digest
        .finish()
        .as_ref()
        .try_into()
        .expect("SHA-256 is 32 bytes")
}

/// `[notBefore, notAfter]` of a DER certificate, in seconds since the epoch.
fn validity(der: &[u8]) -> Option<(i64, i64)> {
    let (_, cert) = X509Certificate::from_der(der).ok()?;
    Some((
        cert.validity().not_before.timestamp(),
        cert.validity().not_after.timestamp(),
    ))
}

fn read_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, String> {
    let bytes = crate::files::read(path).map_err(|e| e.to_string())?;
    let certs: Result<Vec<_>, _> = CertificateDer::pem_slice_iter(&bytes).collect();
    let certs = certs.map_err(|e| format!("{}: invalid PEM: {e}", path.display()))?;
    if certs.is_empty() {
        return Err(format!("{}: no CERTIFICATE found", path.display()));
    }
    Ok(certs)
}

/// CRLs from a PEM file (`X509 CRL` blocks) or a DER file.
/// Each CRL with its `nextUpdate` (seconds since the epoch; `i64::MAX` when it has none,
/// `i64::MIN` when it cannot be read, so that nothing verified against it is remembered).
fn read_crls(path: &Path) -> Result<Vec<(webpki::CertRevocationList<'static>, i64)>, String> {
    use rustls_pki_types::CertificateRevocationListDer;
    let bytes = crate::files::read(path).map_err(|e| e.to_string())?;
    let ders: Vec<Vec<u8>> = if bytes.starts_with(b"-----") {
        CertificateRevocationListDer::pem_slice_iter(&bytes)
            .map(|c| c.map(|d| d.to_vec()))
            .collect::<Result<_, _>>()
            .map_err(|e| format!("{}: invalid PEM: {e}", path.display()))?
    } else {
        vec![bytes]
    };
    if ders.is_empty() {
        return Err(format!("{}: no X509 CRL found", path.display()));
    }
    ders.iter()
        .map(|der| {
            let crl = webpki::OwnedCertRevocationList::from_der(der)
                .map(webpki::CertRevocationList::from)
                .map_err(|e| format!("{}: invalid CRL: {e:?}", path.display()))?;
            let next_update =
                match x509_parser::revocation_list::CertificateRevocationList::from_der(der) {
                    Ok((_, c)) => c.next_update().map_or(i64::MAX, |t| t.timestamp()),
                    Err(_) => i64::MIN,
                };
            Ok((crl, next_update))
        })
        .collect()
}

impl PeerVerifier {
    /// Loads the trust bundle and intermediates named in the settings; `cache` is the most
    /// verified certificates remembered (0: none).
    pub fn load(settings: &PeerSettings, cache: usize) -> Result<PeerVerifier, Vec<String>> {
        let mut problems = Vec::new();
        let mut anchors = Vec::new();
        match read_certs(&settings.trust_bundle) {
            Ok(certs) => {
                for (i, der) in certs.iter().enumerate() {
                    match webpki::anchor_from_trusted_cert(der) {
                        Ok(a) => anchors.push(a.to_owned()),
                        Err(e) => problems.push(format!(
                            "{}: certificate #{} is not a usable trust anchor: {e:?}",
                            settings.trust_bundle.display(),
                            i + 1
                        )),
                    }
                }
            }
            Err(e) => problems.push(e),
        }
        let mut intermediates = Vec::new();
        if let Some(path) = &settings.intermediates {
            match read_certs(path) {
                Ok(certs) if certs.len() > MAX_INTERMEDIATES => problems.push(format!(
                    "{}: more than {MAX_INTERMEDIATES} intermediates",
                    path.display()
                )),
                Ok(certs) => intermediates = certs,
                Err(e) => problems.push(e),
            }
        }
        let mut material_from = i64::MIN;
        let mut material_until = i64::MAX;
        for cert in &intermediates {
            // Dates that cannot be read bound nothing, so nothing is remembered at all.
            let (from, until) = validity(cert).unwrap_or((i64::MAX, i64::MIN));
            material_from = material_from.max(from);
            material_until = material_until.min(until);
        }
        let mut crls = Vec::new();
        for path in &settings.crls {
            match read_crls(path) {
                Ok(list) => {
                    for (crl, next_update) in list {
                        material_until = material_until.min(next_update);
                        crls.push(crl);
                    }
                }
                Err(e) => problems.push(e),
            }
        }
        let trust_domains = settings
            .trust_domains
            .iter()
            .filter_map(|td| TrustDomain::try_from(td.as_str()).ok())
            .collect();
        if problems.is_empty() {
            Ok(PeerVerifier {
                anchors,
                intermediates,
                crls,
                trust_domains,
                max_size: settings.max_size,
                max_request_intermediates: settings.max_request_intermediates,
                material_from,
                material_until,
                cache: (cache > 0).then(|| quick_cache::sync::Cache::new(cache)),
            })
        } else {
            Err(problems)
        }
    }

    /// Verifies a certificate as Envoy sends it in `source.certificate`: one PEM
    /// certificate, percent-encoded.
    pub fn verify_url_encoded_pem(
        &self,
        encoded: &str,
        now: UnixTime,
    ) -> Result<Arc<PeerIdentity>, CertRejection> {
        // SECURITY: cap the peer-controlled size before hashing or decoding anything.
        if encoded.len() > self.max_size {
            return Err(CertRejection::TooLarge { max: self.max_size });
        }
        // The text as sent is remembered too, so a repeat skips decoding as well.
        let key = self
            .cache
            .as_ref()
            .map(|_| digest([b"url-encoded".as_slice(), encoded.as_bytes()]));
        if let Some(hit) = key.as_ref().and_then(|k| self.remembered(k, now)) {
            return Ok(hit);
        }
        let mut certs = self.decode(encoded)?.into_iter();
        let leaf = certs.next().ok_or(CertRejection::Count(0))?;
        // Any further certificates (Traefik sends the chain) may only serve as intermediates.
        let rest: Vec<_> = certs.collect();
        let verified = self.verify_der_entry(&leaf, &rest, now)?;
        if let Some(key) = key {
            self.remember(key, &verified);
        }
        Ok(verified.identity.clone())
    }

    /// URL-encoded PEM to DER certificates, size-capped before decoding.
    fn decode(&self, encoded: &str) -> Result<Vec<CertificateDer<'static>>, CertRejection> {
        // SECURITY: cap the peer-controlled size before decoding anything.
        if encoded.len() > self.max_size {
            return Err(CertRejection::TooLarge { max: self.max_size });
        }
        let pem = percent_encoding::percent_decode_str(encoded)
            .decode_utf8()
            .map_err(|_| CertRejection::Encoding)?;
        // SECURITY: the list is bounded while it is built, whatever the text holds.
        let too_many = |found| CertRejection::TooManyIntermediates {
            found,
            max: self.max_request_intermediates,
        };
        if !pem.contains("-----BEGIN") && !pem.trim().is_empty() {
            // Traefik's passTLSClientCert: base64 DER certificates (no PEM armour) joined by ','.
            use base64::Engine as _;
            let parts = pem.split(',');
            if parts.clone().nth(MAX_DECODED).is_some() {
                return Err(too_many(pem.split(',').count() - 1));
            }
            return parts
                .map(|b64| {
                    base64::engine::general_purpose::STANDARD
                        .decode(b64.trim())
                        .map(CertificateDer::from)
                        .map_err(|_| CertRejection::Encoding)
                })
                .collect();
        }
        let mut certs = Vec::new();
        for cert in CertificateDer::pem_slice_iter(pem.as_bytes()) {
            if certs.len() == MAX_DECODED {
                return Err(too_many(MAX_DECODED));
            }
            certs.push(cert.map_err(|_| CertRejection::Encoding)?);
        }
        Ok(certs)
    }

    fn decode_one(&self, encoded: &str) -> Result<CertificateDer<'static>, CertRejection> {
        match <[_; 1]>::try_from(self.decode(encoded)?) {
            Ok([der]) => Ok(der),
            Err(certs) => Err(CertRejection::Count(certs.len())),
        }
    }

    /// Verifies the certificate of an `x-forwarded-client-cert` element: its `Hash` must
    /// match its `Cert`, and its `Chain` may supply intermediates (never trust anchors).
    pub fn verify_xfcc(
        &self,
        element: &super::xfcc::XfccElement,
        now: UnixTime,
    ) -> Result<Option<Arc<PeerIdentity>>, CertRejection> {
        let Some(cert) = &element.cert else {
            return Ok(None);
        };
        let der = self.decode_one(cert)?;
        super::xfcc::check_hash(element, &der).map_err(|e| CertRejection::Xfcc(e.to_string()))?;
        let chain = match &element.chain {
            Some(chain) => self.decode(chain)?,
            None => Vec::new(),
        };
        // The chain usually starts with the leaf itself: that copy is not an intermediate.
        self.verify_der(&der, &chain, now).map(Some)
    }

    /// Verifies one DER certificate, with `extra` intermediates besides the configured ones.
    /// A path verified before is answered from the cache while every certificate given
    /// and every configured intermediate and CRL is still current; only successes are kept.
    pub fn verify_der(
        &self,
        der: &CertificateDer<'_>,
        extra: &[CertificateDer<'static>],
        now: UnixTime,
    ) -> Result<Arc<PeerIdentity>, CertRejection> {
        if self.cache.is_none() {
            return self
                .verify_der_entry(der, extra, now)
                .map(|v| v.identity.clone());
        }
        let key = digest(std::iter::once(der.as_ref()).chain(extra.iter().map(|c| c.as_ref())));
        if let Some(hit) = self.remembered(&key, now) {
            return Ok(hit);
        }
        let verified = self.verify_der_entry(der, extra, now)?;
        self.remember(key, &verified);
        Ok(verified.identity.clone())
    }

    /// The cached identity under `key`, if its window includes `now`.
    fn remembered(&self, key: &[u8; 32], now: UnixTime) -> Option<Arc<PeerIdentity>> {
        let cache = self.cache.as_ref()?;
        let hit = cache.get(key)?;
        let secs = now.as_secs().min(i64::MAX as u64) as i64;
        if (hit.valid_from..=hit.valid_until).contains(&secs) {
            return Some(hit.identity.clone());
        }
        cache.remove(key);
        None
    }

    fn remember(&self, key: [u8; 32], verified: &Arc<CachedPeer>) {
        if let Some(cache) = &self.cache
            && verified.valid_from <= verified.valid_until
        {
            cache.insert(key, verified.clone());
        }
    }

    /// The certificates a request brought that may serve as intermediates for `leaf`.
    ///
    /// SECURITY: path building is a search over every candidate, so what a request brings
    /// is bounded before webpki sees any of it (issue 12, finding 8: a leaf with 16 junk
    /// "intermediates" issuing each other cost 120-180 ms of CPU per request). Copies of
    /// the leaf do not count; more than `max_request_intermediates` others are refused
    /// outright. Then duplicates (of each other or of a configured intermediate) are dropped,
    /// and so is every certificate that cannot be on the leaf's path: one whose subject is
    /// neither the leaf's issuer nor the issuer of another certificate that can be. Dropping
    /// a candidate only removes paths that could not have verified.
    fn candidates(
        &self,
        leaf: &CertificateDer<'_>,
        brought: &[CertificateDer<'static>],
    ) -> Result<Vec<CertificateDer<'static>>, CertRejection> {
        let others: Vec<&CertificateDer<'static>> = brought
            .iter()
            .filter(|c| c.as_ref() != leaf.as_ref())
            .collect();
        if others.len() > self.max_request_intermediates {
            return Err(CertRejection::TooManyIntermediates {
                found: others.len(),
                max: self.max_request_intermediates,
            });
        }
        if others.is_empty() {
            return Ok(Vec::new());
        }
        let mut unique: Vec<&CertificateDer<'static>> = Vec::with_capacity(others.len());
        for c in others {
            let known = unique.iter().any(|u| u.as_ref() == c.as_ref())
                || self.intermediates.iter().any(|i| i.as_ref() == c.as_ref());
            if !known {
                unique.push(c);
            }
        }
        // (subject, issuer) as raw DER names, compared byte for byte as webpki does.
        // A certificate that does not parse could never be on a path: dropped.
        let names = |der: &[u8]| -> Option<(Vec<u8>, Vec<u8>)> {
            let (_, cert) = X509Certificate::from_der(der).ok()?;
            Some((
                cert.subject().as_raw().to_vec(),
                cert.issuer().as_raw().to_vec(),
            ))
        };
        let Some((_, leaf_issuer)) = names(leaf) else {
            // webpki refuses a leaf it cannot read; it needs no intermediates to do so.
            return Ok(Vec::new());
        };
        let mut pending: Vec<(&CertificateDer<'static>, Vec<u8>, Vec<u8>)> = unique
            .into_iter()
            .filter_map(|c| names(c).map(|(s, i)| (c, s, i)))
            .collect();
        // Configured intermediates extend the names a path may pass through (a request's
        // certificate may sit above one of them), but are never candidates here.
        let configured: Vec<(Vec<u8>, Vec<u8>)> =
            self.intermediates.iter().filter_map(|c| names(c)).collect();
        let mut wanted = vec![leaf_issuer];
        let mut kept = Vec::new();
        let mut seen_configured = vec![false; configured.len()];
        loop {
            let before = wanted.len();
            for (i, (subject, issuer)) in configured.iter().enumerate() {
                if !seen_configured[i] && wanted.contains(subject) {
                    seen_configured[i] = true;
                    wanted.push(issuer.clone());
                }
            }
            let mut rest = Vec::with_capacity(pending.len());
            for (cert, subject, issuer) in pending {
                if wanted.contains(&subject) {
                    wanted.push(issuer);
                    kept.push(cert.clone());
                } else {
                    rest.push((cert, subject, issuer));
                }
            }
            pending = rest;
            if wanted.len() == before {
                return Ok(kept);
            }
        }
    }

    /// Verifies the path and works out the window in which the verdict holds: the latest
    /// `notBefore` and earliest `notAfter` of the leaf, the request's intermediates that
    /// can be on its path and the configured intermediates, and the earliest CRL
    /// `nextUpdate`. A certificate whose dates cannot be read gives an empty window
    /// (nothing is remembered).
    fn verify_der_entry(
        &self,
        der: &CertificateDer<'_>,
        extra: &[CertificateDer<'static>],
        now: UnixTime,
    ) -> Result<Arc<CachedPeer>, CertRejection> {
        let extra = &self.candidates(der, extra)?;
        let identity = Arc::new(self.verify_uncached(der, extra, now)?);
        let (mut valid_from, mut valid_until) = (
            identity.not_before.max(self.material_from),
            identity.not_after.min(self.material_until),
        );
        for cert in extra {
            let (from, until) = validity(cert).unwrap_or((i64::MAX, i64::MIN));
            valid_from = valid_from.max(from);
            valid_until = valid_until.min(until);
        }
        Ok(Arc::new(CachedPeer {
            identity,
            valid_from,
            valid_until,
        }))
    }

    fn verify_uncached(
        &self,
        der: &CertificateDer<'_>,
        extra: &[CertificateDer<'static>],
        now: UnixTime,
    ) -> Result<PeerIdentity, CertRejection> {
        let ee = webpki::EndEntityCert::try_from(der).map_err(map_webpki)?;
        let crl_refs: Vec<&webpki::CertRevocationList<'_>> = self.crls.iter().collect();
        // Every certificate of the path is checked against the configured CRLs; a CA
        // without a configured CRL is not an error, an expired CRL is (fail closed).
        let revocation = webpki::RevocationOptionsBuilder::new(&crl_refs)
            .ok()
            .map(|b| {
                b.with_depth(webpki::RevocationCheckDepth::Chain)
                    .with_status_policy(webpki::UnknownStatusPolicy::Allow)
                    .with_expiration_policy(webpki::ExpirationPolicy::Enforce)
                    .build()
            });
        let intermediates: std::borrow::Cow<'_, [CertificateDer<'static>]> = if extra.is_empty() {
            std::borrow::Cow::Borrowed(&self.intermediates)
        } else {
            std::borrow::Cow::Owned(self.intermediates.iter().chain(extra).cloned().collect())
        };
        ee.verify_for_usage(
            webpki::ALL_VERIFICATION_ALGS,
            &self.anchors,
            &intermediates,
            now,
            webpki::KeyUsage::client_auth(),
            revocation,
            None,
        )
        .map_err(map_webpki)?;
        let (_, cert) =
            X509Certificate::from_der(der).map_err(|e| CertRejection::Invalid(e.to_string()))?;
        self.identity(&cert, der)
    }

    fn identity(
        &self,
        cert: &X509Certificate<'_>,
        der: &[u8],
    ) -> Result<PeerIdentity, CertRejection> {
        let mut uri_sans = Vec::new();
        let mut dns_sans = Vec::new();
        let mut email_sans = Vec::new();
        let san = cert
            .subject_alternative_name()
            .map_err(|e| CertRejection::Invalid(e.to_string()))?;
        for name in san.iter().flat_map(|s| s.value.general_names.iter()) {
            match name {
                GeneralName::URI(u) => uri_sans.push(u.to_string()),
                GeneralName::DNSName(d) => dns_sans.push(d.to_string()),
                GeneralName::RFC822Name(e) => email_sans.push(e.to_string()),
                _ => {}
            }
        }
        let spiffe_id = if uri_sans
            .iter()
            // URI schemes are case-insensitive (RFC 3986 §3.1): `Spiffe://` gets the same rules.
            .any(|u| {
                u.get(..7)
                    .is_some_and(|s| s.eq_ignore_ascii_case("spiffe:"))
            }) {
            Some(self.spiffe_checks(cert, &uri_sans)?)
        } else {
            None
        };
        let digest = aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, der);
        let mut sha256 = [0u8; 32];
        sha256.copy_from_slice(digest.as_ref());
        Ok(PeerIdentity {
            spiffe_id,
            uri_sans,
            dns_sans,
            email_sans,
            subject: cert.subject().to_string(),
            issuer: cert.issuer().to_string(),
            serial: cert
                .tbs_certificate
                .raw_serial()
                .iter()
                .map(|b| format!("{b:02x}"))
                .collect(),
            not_before: cert.validity().not_before.timestamp(),
            not_after: cert.validity().not_after.timestamp(),
            sha256,
            derived: FormSlot::default(),
        })
    }

    /// X.509-SVID rules (SPIFFE X509-SVID §2, §4.1, §4.3).
    fn spiffe_checks(
        &self,
        cert: &X509Certificate<'_>,
        uri_sans: &[String],
    ) -> Result<SpiffeId, CertRejection> {
        if uri_sans.len() != 1 {
            return Err(CertRejection::SpiffeUriCount(uri_sans.len()));
        }
        let ca = cert
            .basic_constraints()
            .map_err(|e| CertRejection::Invalid(e.to_string()))?
            .is_some_and(|bc| bc.value.ca);
        if ca {
            return Err(CertRejection::CaAsLeaf);
        }
        let signs = cert
            .key_usage()
            .map_err(|e| CertRejection::Invalid(e.to_string()))?
            .is_some_and(|ku| ku.value.key_cert_sign() || ku.value.crl_sign());
        if signs {
            return Err(CertRejection::SpiffeSigningLeaf);
        }
        let id = SpiffeId::try_from(uri_sans[0].as_str()).map_err(CertRejection::SpiffeId)?;
        // SECURITY: a certificate from a shared CA must still belong to one of our trust domains.
        if !self.trust_domains.contains(id.trust_domain()) {
            return Err(CertRejection::ForeignTrustDomain(
                id.trust_domain().to_string(),
            ));
        }
        Ok(id)
    }
}

fn map_webpki(e: webpki::Error) -> CertRejection {
    use webpki::Error as E;
    match e {
        E::CertExpired { .. } => CertRejection::Expired,
        E::CertNotValidYet { .. } => CertRejection::NotYetValid,
        E::UnknownIssuer => CertRejection::UnknownIssuer("no path to a trust anchor".into()),
        #[allow(deprecated)]
        E::RequiredEkuNotFound | E::RequiredEkuNotFoundContext(_) => CertRejection::Usage,
        E::CaUsedAsEndEntity => CertRejection::CaAsLeaf,
        E::CertRevoked => CertRejection::Revoked,
        other => CertRejection::Invalid(path_error(&other)),
    }
}

/// A sentence for each path validation error, for the operator: what is wrong with the
/// certificate and, where one is likely, why. webpki's own names
/// (`InvalidSignatureForPublicKey`) say little to someone holding the certificate.
fn path_error(e: &webpki::Error) -> String {
    use webpki::Error as E;
    #[allow(deprecated)]
    let sentence = match e {
        E::BadDer | E::BadDerTime | E::TrailingData(_) => {
            "a certificate in the path is not valid DER"
        }
        E::CaUsedAsEndEntity => "a CA certificate was presented as the client certificate",
        E::CertDistrusted => "a certificate in the path is distrusted",
        E::CertExpired { .. } => "a certificate in the path has expired",
        E::CertNotValidForName(_) => "the certificate is not valid for the expected name",
        E::CertNotValidYet { .. } => "a certificate in the path is not valid yet",
        E::CertRevoked => "a certificate in the path is revoked (CRL)",
        E::CrlExpired { .. } => "a CRL has expired: publish a new one from the CA",
        E::EmptyEkuExtension => "the certificate's extended key usage extension is empty",
        E::EndEntityUsedAsCa => {
            "a certificate that is not a CA (basicConstraints) was used to issue another"
        }
        E::ExtensionValueInvalid | E::MalformedExtensions => {
            "a certificate in the path has a malformed extension"
        }
        E::InvalidCertValidity => {
            "a certificate in the path has a validity period that ends before it begins"
        }
        E::InvalidCrlNumber | E::UnsupportedCrlVersion | E::UnsupportedDeltaCrl
        | E::UnsupportedIndirectCrl | E::UnsupportedCrlIssuingDistributionPoint
        | E::UnsupportedRevocationReason | E::UnsupportedRevocationReasonsPartitioning => {
            "a configured CRL has a form this verifier does not support"
        }
        E::InvalidCrlSignatureForPublicKey => {
            "a CRL's signature does not verify with its issuer's key: was it signed by another CA with the same name?"
        }
        E::InvalidSignatureForPublicKey => {
            "the certificate's signature does not verify with its issuer's key: was it issued by another CA with the same name?"
        }
        E::InvalidNetworkMaskConstraint | E::MalformedNameConstraint => {
            "a CA in the path has a malformed name constraint"
        }
        E::InvalidSerialNumber => "a certificate in the path has an invalid serial number",
        E::IssuerNotCrlSigner => "a CRL is signed by a certificate that may not sign CRLs",
        E::MalformedDnsIdentifier | E::UnsupportedNameType => {
            "the certificate has a name of a form this verifier does not support"
        }
        E::MaximumNameConstraintComparisonsExceeded
        | E::MaximumPathBuildCallsExceeded
        | E::MaximumSignatureChecksExceeded => {
            "building the path took more work than allowed: too many candidate intermediates or names"
        }
        E::MaximumPathDepthExceeded => "the path to a trusted CA is longer than allowed",
        E::NameConstraintViolation => {
            "the certificate has a name that a CA in the path may not issue (name constraints)"
        }
        E::PathLenConstraintViolated => {
            "the path has more intermediates than a CA in it allows (pathLenConstraint)"
        }
        E::RequiredEkuNotFound | E::RequiredEkuNotFoundContext(_) => {
            "the certificate is not valid for client authentication (extended key usage)"
        }
        E::SignatureAlgorithmMismatch => {
            "a certificate's signature algorithm does not match the one in its signed part"
        }
        E::UnknownIssuer => "no path to a trusted CA",
        E::UnknownRevocationStatus => "no CRL covers a certificate in the path",
        E::UnsupportedCertVersion => "a certificate in the path is not X.509 version 3",
        E::UnsupportedCriticalExtension => {
            "a certificate in the path has a critical extension this verifier does not understand"
        }
        E::UnsupportedCrlSignatureAlgorithm
        | E::UnsupportedCrlSignatureAlgorithmContext(_)
        | E::UnsupportedCrlSignatureAlgorithmForPublicKey
        | E::UnsupportedCrlSignatureAlgorithmForPublicKeyContext(_) => {
            "a CRL is signed with an algorithm this verifier does not accept"
        }
        E::UnsupportedSignatureAlgorithm
        | E::UnsupportedSignatureAlgorithmContext(_)
        | E::UnsupportedSignatureAlgorithmForPublicKey
        | E::UnsupportedSignatureAlgorithmForPublicKeyContext(_) => {
            "a certificate in the path is signed with an algorithm this verifier does not accept, or one that does not fit its issuer's key"
        }
        // webpki's errors are non-exhaustive: a new one is still a rejection, named as
        // webpki names it.
        other => return format!("path validation failed ({other:?})"),
    };
    sentence.to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Path validation errors reach the operator as sentences, not webpki's variant names.
    #[test]
    fn path_errors_are_sentences() {
        use webpki::Error as E;
        for (error, sentence) in [
            (
                E::InvalidSignatureForPublicKey,
                "certificate rejected: the certificate's signature does not verify with its issuer's key: was it issued by another CA with the same name?",
            ),
            (
                E::PathLenConstraintViolated,
                "certificate rejected: the path has more intermediates than a CA in it allows (pathLenConstraint)",
            ),
            (
                E::NameConstraintViolation,
                "certificate rejected: the certificate has a name that a CA in the path may not issue (name constraints)",
            ),
            (
                E::UnknownRevocationStatus,
                "certificate rejected: no CRL covers a certificate in the path",
            ),
            (E::CertExpired { time: rustls_pki_types::UnixTime::since_unix_epoch(std::time::Duration::from_secs(2)), not_after: rustls_pki_types::UnixTime::since_unix_epoch(std::time::Duration::from_secs(1)) }, "certificate has expired"),
        ] {
            let text = map_webpki(error).to_string();
            assert_eq!(text, sentence);
        }
        // No variant name of webpki's reaches the text.
        for error in [
            E::BadDer,
            E::EndEntityUsedAsCa,
            E::MaximumPathDepthExceeded,
            E::UnsupportedCriticalExtension,
            E::SignatureAlgorithmMismatch,
            E::InvalidCrlSignatureForPublicKey,
        ] {
            let text = map_webpki(error.clone()).to_string();
            assert!(!text.contains(&format!("{error:?}")), "{text}");
        }
    }
}
