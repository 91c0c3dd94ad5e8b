//! Wire input to [`RequestFacts`]: the only reader of request protos. Envoy's CheckRequest
//! becomes plain data (method, path without query, headers with lower-case names, the
//! URL-encoded peer certificate) with nothing verified yet.

use crate::proto::envoy::config::core::v3::address;
use crate::proto::envoy::service::auth::v3::CheckRequest;
use std::collections::BTreeMap;

use crate::config::Limits;

/// The facts of one HTTP request, as the proxy reported them.
///
/// SECURITY: build it with [`RequestFacts::from_http`] (or `from_check` for an Envoy
/// CheckRequest), which refuse non-canonical paths, differing copies of the host and
/// oversized headers; a struct literal skips those checks.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RequestFacts {
    /// The proxy's request id, when it sent one.
    pub request_id: String,
    /// The method, upper case.
    pub method: String,
    /// The path without its query string.
    pub path: String,
    /// The raw query string, without `?`.
    pub query: String,
    /// The host (`:authority`).
    pub host: String,
    /// The scheme the client used (`https`, `http`), when known.
    pub scheme: String,
    /// Lower-case names; duplicates joined with `,` as Envoy does. This is what policies
    /// see; security-relevant readers use [`RequestFacts::single`] instead.
    pub headers: BTreeMap<String, String>,
    /// Every copy of each header that arrived more than once (by lower-case name, in
    /// arrival order); empty for the usual request.
    pub repeated: BTreeMap<String, Vec<String>>,
    /// The client's address, when known.
    pub source_address: String,
    /// The client certificate as Envoy sends it: URL-encoded PEM.
    pub peer_certificate: Option<String>,
    /// The route's `context_extensions` (Envoy), which policies read as `context.route`.
    pub context_extensions: BTreeMap<String, String>,
}

/// Why a request could not be read.
#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
#[non_exhaustive]
pub enum FactsError {
    /// Request has no HTTP attributes.
    #[error("request has no HTTP attributes")]
    NoHttpRequest,
    /// Request has no method.
    #[error("request has no method")]
    NoMethod,
    /// Request has no path.
    #[error("request has no path")]
    NoPath,
    /// More headers than `[limits] max_headers` (given).
    #[error("request has more than {0} headers")]
    TooManyHeaders(usize),
    /// More header bytes than `[limits] max_header_bytes` (given).
    #[error("request headers are larger than {0} bytes")]
    HeadersTooLarge(usize),
    /// A header (named) is not valid UTF-8.
    #[error("header \"{0}\" is not valid UTF-8")]
    HeaderEncoding(String),
    /// The path is not in canonical form (why is given).
    #[error("path is not in canonical form ({0})")]
    NonCanonicalPath(&'static str),
    /// Headers (named) disagree about the original request.
    #[error("headers {0} disagree about the original request")]
    ConflictingHeaders(String),
    /// A security-relevant header (named) arrived more than once with different values.
    #[error("header \"{0}\" arrived more than once with different values")]
    RepeatedHeader(String),
    /// `headers` and `header_map` disagree about a header (named).
    #[error("`headers` and `header_map` disagree about header \"{0}\"")]
    HeaderFormsDisagree(String),
}

/// A security-relevant header that arrived more than once with different values.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RepeatedHeader(pub String);

/// Headers by lower-case name: the joined view policies see, and every copy of the names
/// that arrived more than once.
#[derive(Default)]
struct Collected {
    joined: BTreeMap<String, String>,
    repeated: BTreeMap<String, Vec<String>>,
}

impl Collected {
    /// Headers as a proxy received them (names in any case, values as bytes), each counted
    /// against `limits` before it is copied; a value that is not UTF-8 refuses the request.
    fn from_headers<N: AsRef<str>, V: Into<Vec<u8>>>(
        headers: impl IntoIterator<Item = (N, V)>,
        limits: &Limits,
    ) -> Result<Collected, FactsError> {
        let mut budget = HeaderBudget {
            limits,
            count: 0,
            bytes: 0,
        };
        let mut collected = Collected::default();
        for (name, value) in headers {
            let value = value.into();
            budget.take(name.as_ref(), value.len())?;
            let name = name.as_ref().to_ascii_lowercase();
            let value =
                String::from_utf8(value).map_err(|_| FactsError::HeaderEncoding(name.clone()))?;
            collected.add(name, value);
        }
        Ok(collected)
    }

    fn add(&mut self, name: String, value: String) {
        match self.joined.get_mut(&name) {
            Some(joined) => {
                let copies = self
                    .repeated
                    .entry(name)
                    .or_insert_with(|| vec![joined.clone()]);
                joined.push(',');
                joined.push_str(&value);
                copies.push(value);
            }
            None => {
                self.joined.insert(name, value);
            }
        }
    }
}

/// Splits a raw request target into path and query, refusing paths that are not in
/// canonical form. SECURITY: policies match the path as text (`like "/api/admin/*"`), while
/// upstreams often normalize it; `/api//admin`, `/api/%61dmin`, `/api/x/..%2Fadmin` or
/// `/api/admin;x` would slip past such a policy and still reach `/api/admin`. Refusing
/// them (400) is the fail-closed choice; RFC 3986 §6.2.2 defines the canonical form.
pub fn split_path(raw: &str) -> Result<(String, String), FactsError> {
    let (path, query) = raw.split_once('?').unwrap_or((raw, ""));
    if !path.starts_with('/') {
        return Err(FactsError::NoPath);
    }
    let bytes = path.as_bytes();
    if path.contains("//") {
        return Err(FactsError::NonCanonicalPath("empty segment"));
    }
    if path.split('/').any(|seg| seg == "." || seg == "..") {
        return Err(FactsError::NonCanonicalPath("dot segment"));
    }
    if bytes
        .iter()
        .any(|&b| b == b'\\' || b == b';' || b.is_ascii_control() || b == b' ' || b == b'#')
    {
        return Err(FactsError::NonCanonicalPath(
            "backslash, ';', space or control character",
        ));
    }
    for (i, _) in path.match_indices('%') {
        let hex = path
            .get(i + 1..i + 3)
            .and_then(|h| u8::from_str_radix(h, 16).ok());
        match hex {
            None => return Err(FactsError::NonCanonicalPath("malformed percent-encoding")),
            // Encoded unreserved characters (§2.3) and encoded '/', '\\' or ';' have a
            // plain form that an upstream may decode to.
            Some(b) if b.is_ascii_alphanumeric() || b"-._~/\\;".contains(&b) => {
                return Err(FactsError::NonCanonicalPath(
                    "needlessly percent-encoded character",
                ));
            }
            Some(_) => {}
        }
    }
    Ok((path.to_string(), query.to_string()))
}

/// [`split_path`], and with `strict` also [`check_decoded_path`].
pub fn split_path_with(raw: &str, strict: bool) -> Result<(String, String), FactsError> {
    let (path, query) = split_path(raw)?;
    if strict {
        check_decoded_path(&path)?;
    }
    Ok((path, query))
}

/// Code points that render as nothing (Unicode's Default_Ignorable_Code_Point, which
/// includes the zero-width and bidirectional controls) and so can hide inside a path.
fn invisible(c: char) -> bool {
    matches!(c as u32,
        0x00AD | 0x034F | 0x061C | 0x115F..=0x1160 | 0x17B4..=0x17B5 | 0x180B..=0x180F
        | 0x200B..=0x200F | 0x202A..=0x202E | 0x2060..=0x206F | 0x3164 | 0xFE00..=0xFE0F
        | 0xFEFF | 0xFFA0 | 0xFFF0..=0xFFF8 | 0x1BCA0..=0x1BCA3 | 0x1D173..=0x1D17A
        | 0xE0000..=0xE0FFF)
}

/// The checks beyond RFC 3986's canonical form (`[limits] strict_paths`, on by default).
/// SECURITY: a policy matches the path as text, while an upstream may decode it again or
/// normalise it: `%2561dmin` is `%61dmin` after one decoding and `admin` after two;
/// `%c0%ae` is an overlong `.` that lenient decoders accept; `%00` ends a C string;
/// fullwidth `ａdmin` is `admin` under NFKC; a zero-width space is invisible in a policy
/// review. Each of these is refused (400), so what the policy judged is what the upstream
/// serves. Look-alikes that no normalisation maps to ASCII (Cyrillic `а`) stay distinct
/// characters to every upstream and are allowed.
pub fn check_decoded_path(path: &str) -> Result<(), FactsError> {
    let bytes = path.as_bytes();
    let mut decoded = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            // split_path has checked that two hex digits follow.
            let hex = |b: u8| (b as char).to_digit(16);
            let (Some(hi), Some(lo)) = (
                bytes.get(i + 1).copied().and_then(hex),
                bytes.get(i + 2).copied().and_then(hex),
            ) else {
                return Err(FactsError::NonCanonicalPath("malformed percent-encoding"));
            };
            let b = (hi * 16 + lo) as u8;
            if b == b'%'
                && bytes.get(i + 3).is_some_and(u8::is_ascii_hexdigit)
                && bytes.get(i + 4).is_some_and(u8::is_ascii_hexdigit)
            {
                return Err(FactsError::NonCanonicalPath("double percent-encoding"));
            }
            decoded.push(b);
            i += 3;
        } else {
            decoded.push(bytes[i]);
            i += 1;
        }
    }
    let Ok(text) = std::str::from_utf8(&decoded) else {
        return Err(FactsError::NonCanonicalPath(
            "percent-encoded bytes that are not UTF-8 (overlong or invalid)",
        ));
    };
    if text.chars().any(char::is_control) {
        return Err(FactsError::NonCanonicalPath("encoded control character"));
    }
    if !text.is_ascii() {
        if text.chars().any(|c| invisible(c) || c.is_whitespace()) {
            return Err(FactsError::NonCanonicalPath(
                "invisible or non-ASCII space character",
            ));
        }
        use unicode_normalization::UnicodeNormalization;
        if !text.nfkc().eq(text.chars()) {
            return Err(FactsError::NonCanonicalPath(
                "character that Unicode normalisation (NFKC) changes",
            ));
        }
    }
    Ok(())
}

/// Counts headers and their bytes against the limits, before anything is copied.
struct HeaderBudget<'a> {
    limits: &'a Limits,
    count: usize,
    bytes: usize,
}

impl HeaderBudget<'_> {
    /// One header: its name and `value_len` bytes of value.
    fn take(&mut self, name: &str, value_len: usize) -> Result<(), FactsError> {
        self.count += 1;
        self.bytes = self
            .bytes
            .saturating_add(name.len().saturating_add(value_len));
        if self.count > self.limits.max_headers {
            return Err(FactsError::TooManyHeaders(self.limits.max_headers));
        }
        if self.bytes > self.limits.max_header_bytes {
            return Err(FactsError::HeadersTooLarge(self.limits.max_header_bytes));
        }
        Ok(())
    }
}

impl TryFrom<&CheckRequest> for RequestFacts {
    type Error = FactsError;

    /// With the default [`Limits`].
    fn try_from(req: &CheckRequest) -> Result<Self, FactsError> {
        RequestFacts::from_check(req, &Limits::default())
    }
}

impl RequestFacts {
    /// The one value of a header that policies or verification depend on: `None` when it
    /// is absent, the value when it arrived once or every copy is identical, and an error
    /// when copies differ. SECURITY: never a join of the copies, never one picked.
    pub fn single(&self, name: &str) -> Result<Option<&str>, RepeatedHeader> {
        match self.repeated.get(name) {
            Some(copies) => match copies.split_first() {
                Some((first, rest)) if rest.iter().all(|c| c == first) => Ok(Some(first)),
                _ => Err(RepeatedHeader(name.to_string())),
            },
            None => Ok(self.headers.get(name).map(String::as_str)),
        }
    }

    /// Every copy of a header, in arrival order (one for a header that arrived once).
    pub fn copies(&self, name: &str) -> Vec<&str> {
        match self.repeated.get(name) {
            Some(copies) => copies.iter().map(String::as_str).collect(),
            None => self
                .headers
                .get(name)
                .map(String::as_str)
                .into_iter()
                .collect(),
        }
    }

    /// The facts of an Envoy CheckRequest, within `limits`.
    pub fn from_check(req: &CheckRequest, limits: &Limits) -> Result<RequestFacts, FactsError> {
        let mut budget = HeaderBudget {
            limits,
            count: 0,
            bytes: 0,
        };
        let attrs = req.attributes.as_ref().ok_or(FactsError::NoHttpRequest)?;
        let http = attrs
            .request
            .as_ref()
            .and_then(|r| r.http.as_ref())
            .ok_or(FactsError::NoHttpRequest)?;

        // `header_map` replaces `headers` when the filter sets `encode_raw_headers`.
        // SECURITY: a request that carries both must not say two things: the forms are
        // compared, and a disagreement fails the request rather than one being ignored.
        let raw = match &http.header_map {
            Some(map) if !map.headers.is_empty() => {
                let mut raw = Collected::default();
                for h in &map.headers {
                    budget.take(&h.key, h.value.len().saturating_add(h.raw_value.len()))?;
                    let value = if h.raw_value.is_empty() {
                        h.value.clone()
                    } else {
                        String::from_utf8(h.raw_value.clone())
                            .map_err(|_| FactsError::HeaderEncoding(h.key.clone()))?
                    };
                    raw.add(h.key.to_ascii_lowercase(), value);
                }
                Some(raw)
            }
            _ => None,
        };
        // In name order, so that joined values do not depend on the map's order.
        let mut pairs: Vec<_> = http.headers.iter().collect();
        pairs.sort_unstable();
        let mut plain = Collected::default();
        for (k, v) in pairs {
            budget.take(k, v.len())?;
            // Envoy sends lower-case names; names differing only in case are one
            // header, joined as Envoy joins repeats (never one silently dropped).
            plain.add(k.to_ascii_lowercase(), v.clone());
        }
        let Collected {
            joined: headers,
            repeated,
        } = match raw {
            Some(raw) => {
                if let Some(name) = plain
                    .joined
                    .iter()
                    .find(|(k, v)| raw.joined.get(*k) != Some(*v))
                    .map(|(k, _)| k.clone())
                {
                    return Err(FactsError::HeaderFormsDisagree(name));
                }
                raw
            }
            None => plain,
        };

        let pseudo = |name: &str| headers.get(name).cloned().unwrap_or_default();
        let method = non_empty(&http.method).unwrap_or_else(|| pseudo(":method"));
        if method.is_empty() {
            return Err(FactsError::NoMethod);
        }
        let raw_path = non_empty(&http.path).unwrap_or_else(|| pseudo(":path"));
        if raw_path.is_empty() {
            return Err(FactsError::NoPath);
        }
        let (path, mut query) = split_path_with(&raw_path, limits.strict_paths)?;
        if query.is_empty() {
            query = http.query.clone();
        }
        let host = non_empty(&http.host).unwrap_or_else(|| pseudo(":authority"));
        let scheme = non_empty(&http.scheme).unwrap_or_else(|| pseudo(":scheme"));

        let source = attrs.source.as_ref();
        let source_address = source
            .and_then(|s| s.address.as_ref())
            .and_then(|a| a.address.as_ref())
            .map(|a| match a {
                address::Address::SocketAddress(s) => s.address.clone(),
                address::Address::Pipe(p) => p.path.clone(),
                address::Address::EnvoyInternalAddress(_) => String::new(),
            })
            .unwrap_or_default();
        let peer_certificate = source
            .map(|s| s.certificate.clone())
            .filter(|c| !c.is_empty());

        Ok(RequestFacts {
            request_id: non_empty(&http.id)
                .or_else(|| headers.get("x-request-id").cloned())
                .unwrap_or_default(),
            method: method.to_ascii_uppercase(),
            path,
            query,
            host,
            scheme,
            headers,
            repeated,
            source_address,
            peer_certificate,
            context_extensions: attrs
                .context_extensions
                .iter()
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect(),
        })
    }

    /// The facts of a forward-auth request (nginx `auth_request`, Traefik `forwardAuth`):
    /// the original method, URI, host and scheme come from the configured headers, each
    /// list tried in order. `peer_address` is the TCP peer, used when no source header is set.
    pub fn from_forwarded(
        headers: impl IntoIterator<Item = (String, Vec<u8>)>,
        settings: &crate::config::ForwardAuthSettings,
        peer_address: Option<std::net::SocketAddr>,
        limits: &Limits,
    ) -> Result<RequestFacts, FactsError> {
        let collected = Collected::from_headers(headers, limits)?;
        let facts = RequestFacts {
            headers: collected.joined,
            repeated: collected.repeated,
            ..RequestFacts::default()
        };
        // SECURITY: every header the original request is read from is security-relevant:
        // a proxy that appends (HAProxy `add-header`, Apache `RequestHeader add`) next to
        // the client's own copy must not be judged on the two joined, nor on either one.
        let single = |name: &String| -> Result<Option<&str>, FactsError> {
            facts
                .single(name)
                .map(|v| v.filter(|v| !v.is_empty()))
                .map_err(|RepeatedHeader(n)| FactsError::RepeatedHeader(n))
        };
        // SECURITY: when a proxy sets only one header of a list, a client could send
        // another one of it; so all that are present must agree.
        let agreed = |names: &[String]| -> Result<Option<String>, FactsError> {
            let mut first: Option<&str> = None;
            for name in names {
                match (single(name)?, first) {
                    (Some(v), Some(f)) if v != f => {
                        return Err(FactsError::ConflictingHeaders(names.join(", ")));
                    }
                    (Some(v), None) => first = Some(v),
                    _ => {}
                }
            }
            Ok(first.map(str::to_string))
        };
        let first = |names: &[String]| -> Result<Option<String>, FactsError> {
            for name in names {
                if let Some(v) = single(name)? {
                    return Ok(Some(v.to_string()));
                }
            }
            Ok(None)
        };
        let method = agreed(&settings.method_headers)?.ok_or(FactsError::NoMethod)?;
        let uri = agreed(&settings.uri_headers)?.ok_or(FactsError::NoPath)?;
        // `Host` names Portcullis itself on a forwarded subrequest, so for the host the
        // first header present wins.
        let host = first(&settings.host_headers)?.unwrap_or_default();
        let scheme = agreed(&settings.proto_headers)?.unwrap_or_default();
        let (path, query) = split_path_with(&uri, limits.strict_paths)?;
        let source_address = first(&settings.source_headers)?
            // X-Forwarded-For: the left-most entry is the original client.
            .map(|v| v.split(',').next().unwrap_or_default().trim().to_string())
            .or_else(|| peer_address.map(|a| a.ip().to_string()))
            .unwrap_or_default();
        Ok(RequestFacts {
            request_id: facts
                .headers
                .get("x-request-id")
                .cloned()
                .unwrap_or_default(),
            method: method.to_ascii_uppercase(),
            path,
            query,
            host,
            scheme,
            source_address,
            peer_certificate: None,
            context_extensions: BTreeMap::new(),
            ..facts
        })
    }

    /// The facts of a request a proxy holds itself (a proxy that embeds the engine):
    /// its method, its path with the query, its headers as received, the client
    /// certificate of its connection as PEM (leaf first, then any intermediates) when the
    /// client presented one, and the client's address. The same checks as the Envoy door
    /// apply: header count and bytes within `limits`, a canonical path, repeated headers
    /// kept apart. The host is the `host` header's; `scheme` is how the request arrived
    /// (`"https"` or `"http"`).
    pub fn from_http<'h>(
        method: &str,
        path_and_query: &str,
        scheme: &str,
        headers: impl IntoIterator<Item = (&'h str, &'h [u8])>,
        peer_certificate_pem: Option<&str>,
        source: Option<std::net::SocketAddr>,
        limits: &Limits,
    ) -> Result<RequestFacts, FactsError> {
        let collected = Collected::from_headers(headers, limits)?;
        if method.is_empty() {
            return Err(FactsError::NoMethod);
        }
        if path_and_query.is_empty() {
            return Err(FactsError::NoPath);
        }
        let (path, query) = split_path_with(path_and_query, limits.strict_paths)?;
        let facts = RequestFacts {
            headers: collected.joined,
            repeated: collected.repeated,
            ..RequestFacts::default()
        };
        // SECURITY: the host decides which policies apply to a request; two differing
        // copies are refused, not joined or one picked.
        let host = facts
            .single("host")
            .map_err(|RepeatedHeader(n)| FactsError::RepeatedHeader(n))?
            .unwrap_or_default()
            .to_string();
        Ok(RequestFacts {
            request_id: facts
                .headers
                .get("x-request-id")
                .cloned()
                .unwrap_or_default(),
            method: method.to_ascii_uppercase(),
            path,
            query,
            host,
            scheme: scheme.to_string(),
            source_address: source.map(|a| a.ip().to_string()).unwrap_or_default(),
            peer_certificate: peer_certificate_pem
                .filter(|pem| !pem.is_empty())
                .map(envoy_url_encode),
            context_extensions: BTreeMap::new(),
            ..facts
        })
    }
}

/// Envoy's escaping of the PEM it sends: newline, space, `+`, `/` and `=` (and `%`).
pub fn envoy_url_encode(pem: &str) -> String {
    let mut out = String::with_capacity(pem.len() * 11 / 10);
    for c in pem.chars() {
        match c {
            '\n' => out.push_str("%0A"),
            ' ' => out.push_str("%20"),
            '+' => out.push_str("%2B"),
            '/' => out.push_str("%2F"),
            '=' => out.push_str("%3D"),
            '%' => out.push_str("%25"),
            c => out.push(c),
        }
    }
    out
}

fn non_empty(s: &str) -> Option<String> {
    (!s.is_empty()).then(|| s.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proto::envoy::config::core::v3::{HeaderMap, HeaderValue};
    use crate::proto::envoy::service::auth::v3::{AttributeContext, attribute_context};

    fn request(http: attribute_context::HttpRequest) -> CheckRequest {
        CheckRequest {
            attributes: Some(AttributeContext {
                request: Some(attribute_context::Request {
                    time: None,
                    http: Some(http),
                }),
                ..Default::default()
            }),
        }
    }

    #[test]
    fn path_query_and_headers() {
        let mut http = attribute_context::HttpRequest {
            method: "get".into(),
            path: "/orders/1?x=1&y=2".into(),
            host: "api.example".into(),
            ..Default::default()
        };
        http.headers.insert("X-Thing".into(), "a,b".into());
        let f = RequestFacts::try_from(&request(http)).unwrap();
        assert_eq!(f.method, "GET");
        assert_eq!(f.path, "/orders/1");
        assert_eq!(f.query, "x=1&y=2");
        assert_eq!(f.headers["x-thing"], "a,b");
    }

    #[test]
    fn header_map_is_used_and_duplicates_joined() {
        let http = attribute_context::HttpRequest {
            method: "POST".into(),
            path: "/".into(),
            header_map: Some(HeaderMap {
                headers: vec![
                    HeaderValue {
                        key: "x-a".into(),
                        value: "1".into(),
                        raw_value: vec![],
                    },
                    HeaderValue {
                        key: "X-A".into(),
                        value: String::new(),
                        raw_value: b"2".to_vec(),
                    },
                ],
            }),
            ..Default::default()
        };
        let f = RequestFacts::try_from(&request(http)).unwrap();
        assert_eq!(f.headers["x-a"], "1,2");
        assert_eq!(f.copies("x-a"), ["1", "2"]);
        assert_eq!(f.single("x-a"), Err(RepeatedHeader("x-a".into())));
    }

    #[test]
    fn both_header_forms_must_agree() {
        let map = |pairs: &[(&str, &str)]| HeaderMap {
            headers: pairs
                .iter()
                .map(|(k, v)| HeaderValue {
                    key: k.to_string(),
                    value: v.to_string(),
                    raw_value: vec![],
                })
                .collect(),
        };
        let mut http = attribute_context::HttpRequest {
            method: "GET".into(),
            path: "/".into(),
            header_map: Some(map(&[("authorization", "Bearer a.b.c"), ("x-a", "1")])),
            ..Default::default()
        };
        http.headers.insert("x-a".into(), "1".into());
        assert!(RequestFacts::try_from(&request(http.clone())).is_ok());
        http.headers
            .insert("authorization".into(), "Bearer x.y.z".into());
        assert_eq!(
            RequestFacts::try_from(&request(http.clone())),
            Err(FactsError::HeaderFormsDisagree("authorization".into()))
        );
        http.headers.clear();
        http.headers.insert("x-a".into(), "2".into());
        assert_eq!(
            RequestFacts::try_from(&request(http)),
            Err(FactsError::HeaderFormsDisagree("x-a".into()))
        );
    }

    #[test]
    fn identical_copies_are_one_value() {
        let mut f = RequestFacts::default();
        f.headers.insert("x-a".into(), "1,1".into());
        f.repeated
            .insert("x-a".into(), vec!["1".into(), "1".into()]);
        assert_eq!(f.single("x-a"), Ok(Some("1")));
        assert_eq!(f.single("x-b"), Ok(None));
    }

    fn forward_auth() -> crate::config::ForwardAuthSettings {
        let list = |names: &[&str]| names.iter().map(|n| n.to_string()).collect();
        crate::config::ForwardAuthSettings {
            path: "/auth".into(),
            method_headers: list(&["x-forwarded-method", "x-original-method"]),
            uri_headers: list(&["x-forwarded-uri", "x-original-uri"]),
            host_headers: list(&["x-forwarded-host", "host"]),
            proto_headers: list(&["x-forwarded-proto"]),
            source_headers: list(&["x-real-ip", "x-forwarded-for"]),
        }
    }

    fn forwarded(pairs: &[(&str, &str)]) -> Result<RequestFacts, FactsError> {
        RequestFacts::from_forwarded(
            pairs
                .iter()
                .map(|(k, v)| (k.to_string(), v.as_bytes().to_vec())),
            &forward_auth(),
            None,
            &Limits::default(),
        )
    }

    #[test]
    fn a_repeated_forward_auth_header_fails_the_request() {
        let base = [("x-forwarded-method", "GET"), ("x-forwarded-host", "api")];
        let with = |extra: &[(&'static str, &'static str)]| {
            let mut v = base.to_vec();
            v.extend_from_slice(extra);
            forwarded(&v)
        };
        // The client's copy, then the proxy's appended one: never joined, never picked.
        assert_eq!(
            with(&[
                ("x-forwarded-uri", "/public/x"),
                ("X-Forwarded-Uri", "/orders/secret")
            ]),
            Err(FactsError::RepeatedHeader("x-forwarded-uri".into()))
        );
        assert_eq!(
            with(&[
                ("x-forwarded-uri", "/public/x?"),
                ("x-forwarded-uri", "/public/x")
            ]),
            Err(FactsError::RepeatedHeader("x-forwarded-uri".into()))
        );
        for name in [
            "x-forwarded-method",
            "x-forwarded-host",
            "x-forwarded-proto",
            "x-real-ip",
            "x-forwarded-for",
        ] {
            let r = with(&[("x-forwarded-uri", "/a"), (name, "one"), (name, "two")]);
            assert_eq!(r, Err(FactsError::RepeatedHeader(name.into())), "{name}");
        }
        // Identical copies are one value.
        let f = with(&[("x-forwarded-uri", "/a?q=1"), ("x-forwarded-uri", "/a?q=1")]).unwrap();
        assert_eq!((f.path.as_str(), f.query.as_str()), ("/a", "q=1"));
    }

    use proptest::prelude::*;

    proptest! {
        /// Over random multiplicities, orders and letter cases of the headers a
        /// forward-auth request is read from: the request is read only when every copy of
        /// each header is identical, and then exactly as the one copy says.
        #[test]
        fn forward_auth_headers_are_one_value_or_refused(
            copies in prop::collection::vec(
                (
                    prop::sample::select(vec!["x-forwarded-uri", "X-Original-URI", "x-original-uri", "X-FORWARDED-URI"]),
                    prop::sample::select(vec!["/a", "/b", "/a?x"]),
                ),
                1..5,
            ),
            order in prop::collection::vec(any::<usize>(), 5),
        ) {
            let mut pairs: Vec<(&str, &str)> = vec![("x-forwarded-method", "GET")];
            let mut shuffled = copies.clone();
            for (i, j) in order.iter().enumerate() {
                let n = shuffled.len();
                shuffled.swap(i % n, j % n);
            }
            pairs.extend(shuffled.iter().map(|(k, v)| (*k, *v)));
            let got = forwarded(&pairs);
            let by_name = |n: &str| shuffled.iter().filter(|(k, _)| k.eq_ignore_ascii_case(n)).map(|(_, v)| *v).collect::<Vec<_>>();
            let fwd = by_name("x-forwarded-uri");
            let orig = by_name("x-original-uri");
            let agree = |c: &[&str]| c.iter().all(|v| *v == c[0]);
            if !agree(&fwd) || !agree(&orig) {
                prop_assert!(matches!(got, Err(FactsError::RepeatedHeader(_))), "{got:?}");
            } else if !fwd.is_empty() && !orig.is_empty() && fwd[0] != orig[0] {
                prop_assert!(matches!(got, Err(FactsError::ConflictingHeaders(_))), "{got:?}");
            } else {
                let uri = fwd.first().or(orig.first()).copied().unwrap_or_default();
                let f = got.expect("readable");
                let (path, query) = uri.split_once('?').unwrap_or((uri, ""));
                prop_assert_eq!((f.path.as_str(), f.query.as_str()), (path, query));
            }
        }
    }

    #[test]
    fn strict_paths_refuse_what_an_upstream_could_decode_differently() {
        for ok in [
            "/files/%E2%82%AC",
            "/files/caf%C3%A9",
            "/files/café",
            "/a/%25",
            "/a/100%25-cotton",
            "/api/%D0%B0dmin",
            "/a/%20b",
        ] {
            assert!(split_path_with(ok, true).is_ok(), "{ok}");
        }
        for bad in [
            "/api/%2561dmin",
            "/api/%252e%252e/admin",
            "/api/%25%32%65",
            "/api/%c0%ae%c0%ae/admin",
            "/api/%C0%AF",
            "/api/%e0%80%ae",
            "/api/%ff",
            "/api/%ed%a0%80",
            "/api/admin%00.json",
            "/api/%7f",
            "/api/%c2%85",
            "/api/ａdmin",
            "/api/%EF%BD%81dmin",
            "/api/%EF%BC%8Fadmin",
            "/api/ad%E2%80%8Bmin",
            "/api/ad\u{200b}min",
            "/api/admin\u{feff}",
            "/api/%E2%80%AEnimda",
            "/api/a%C2%A0b",
            "/api/\u{3000}",
            "/api/\u{fb01}le",
            "/api/e%CC%81",
        ] {
            assert!(split_path_with(bad, true).is_err(), "{bad}");
            // The switch keeps only RFC 3986's canonical-form checks.
            let _ = split_path_with(bad, false);
        }
        assert!(split_path_with("/api/%2561dmin", false).is_ok());
        assert!(split_path_with("/api/ａdmin", false).is_ok());
    }

    #[test]
    fn non_canonical_paths_are_refused() {
        for ok in [
            "/",
            "/api/orders",
            "/api/a%20b",
            "/files/%E2%82%AC",
            "/a.b/c..d/.e",
            "/x?q=a//b;c",
        ] {
            assert!(split_path(ok).is_ok(), "{ok}");
        }
        for bad in [
            "/api//admin",
            "/api/./admin",
            "/api/x/../admin",
            "/api/..",
            "/api/%61dmin",
            "/api/admin%2Fusers",
            "/api/admin%2fusers",
            "/api/x/..%2Fadmin",
            "/api/admin;x/users",
            "/api\\admin",
            "/api/%5Cadmin",
            "/api/%2E%2E/admin",
            "/api/%zz",
            "/api/%4",
            "relative",
        ] {
            assert!(split_path(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn a_proxys_own_request_is_read_as_the_envoy_door_reads_one() {
        let pem = "-----BEGIN CERTIFICATE-----\nMIIB+/a=\n-----END CERTIFICATE-----\n";
        let headers = [
            ("Host", b"shop.example".as_slice()),
            ("X-Request-Id", b"r1".as_slice()),
        ];
        let source = "192.0.2.7:4433".parse().ok();
        let limits = Limits::default();
        let facts =
            RequestFacts::from_http("get", "/api/x?a=1", "https", headers, Some(pem), source, &limits)
                .expect("readable");
        assert_eq!(
            (facts.method.as_str(), facts.path.as_str(), facts.query.as_str()),
            ("GET", "/api/x", "a=1")
        );
        assert_eq!((facts.host.as_str(), facts.scheme.as_str()), ("shop.example", "https"));
        assert_eq!((facts.request_id.as_str(), facts.source_address.as_str()), ("r1", "192.0.2.7"));
        // The certificate is kept as Envoy sends it, and decodes back to the PEM.
        let encoded = facts.peer_certificate.expect("certificate");
        assert!(!encoded.contains('\n') && !encoded.contains('+'));
        let decoded = percent_encoding::percent_decode_str(&encoded).decode_utf8().unwrap();
        assert_eq!(decoded, pem);
    }

    #[test]
    fn a_proxys_own_request_is_refused_as_the_envoy_door_refuses_one() {
        let limits = Limits::default();
        let read = |method: &str, target: &str, headers: &[(&str, &[u8])]| {
            RequestFacts::from_http(method, target, "https", headers.iter().copied(), None, None, &limits)
        };
        // Two hosts that differ decide which policies apply: refused, never joined or picked.
        assert_eq!(
            read("GET", "/", &[("host", b"a.example"), ("Host", b"b.example")]),
            Err(FactsError::RepeatedHeader("host".into()))
        );
        let same = read("GET", "/", &[("host", b"a.example"), ("host", b"a.example")]);
        assert_eq!(same.map(|f| f.host), Ok("a.example".to_string()));
        assert!(matches!(read("GET", "/api//admin", &[]), Err(FactsError::NonCanonicalPath(_))));
        assert!(matches!(read("GET", "/%2561dmin", &[]), Err(FactsError::NonCanonicalPath(_))));
        assert_eq!(read("", "/", &[]), Err(FactsError::NoMethod));
        assert_eq!(read("GET", "", &[]), Err(FactsError::NoPath));
        assert_eq!(
            read("GET", "/", &[("x-a", b"\xff")]),
            Err(FactsError::HeaderEncoding("x-a".into()))
        );
        let few = Limits {
            max_headers: 1,
            ..Limits::default()
        };
        let two: [(&str, &[u8]); 2] = [("a", b"1"), ("b", b"2")];
        assert_eq!(
            RequestFacts::from_http("GET", "/", "https", two, None, None, &few),
            Err(FactsError::TooManyHeaders(1))
        );
    }

    #[test]
    fn unreadable_requests() {
        assert_eq!(
            RequestFacts::try_from(&CheckRequest::default()),
            Err(FactsError::NoHttpRequest)
        );
        let http = attribute_context::HttpRequest {
            path: "/".into(),
            ..Default::default()
        };
        assert_eq!(
            RequestFacts::try_from(&request(http)),
            Err(FactsError::NoMethod)
        );
        let mut http = attribute_context::HttpRequest {
            method: "GET".into(),
            path: "/".into(),
            ..Default::default()
        };
        let limits = Limits {
            max_headers: 4,
            max_header_bytes: 64,
            ..Limits::default()
        };
        for i in 0..4 {
            http.headers.insert(format!("h{i}"), String::new());
        }
        assert!(RequestFacts::from_check(&request(http.clone()), &limits).is_ok());
        http.headers.insert("h4".into(), String::new());
        assert_eq!(
            RequestFacts::from_check(&request(http.clone()), &limits),
            Err(FactsError::TooManyHeaders(4))
        );
        http.headers.clear();
        http.headers.insert("big".into(), "x".repeat(62));
        assert_eq!(
            RequestFacts::from_check(&request(http.clone()), &limits),
            Err(FactsError::HeadersTooLarge(64))
        );
        http.headers.insert("big".into(), "x".repeat(61));
        assert!(RequestFacts::from_check(&request(http), &limits).is_ok());
    }
}
