//! Wire input to [`RequestFacts`]: the only reader of request protos. Envoy's CheckRequest
//! becomes plain data (method, path without query, headers with lower-case names, the
//! URL-encoded peer certificate) with nothing verified yet.

use crate::proto::envoy::config::core::v3::address;
use crate::proto::envoy::service::auth::v3::CheckRequest;
use std::collections::BTreeMap;

use crate::config::Limits;

/// The facts of one HTTP request, as the proxy reported them.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RequestFacts {
    pub request_id: String,
    pub method: String,
    /// The path without its query string.
    pub path: String,
    /// The raw query string, without `?`.
    pub query: String,
    pub host: String,
    pub scheme: String,
    /// Lower-case names; duplicates joined with `,` as Envoy does.
    pub headers: BTreeMap<String, String>,
    pub source_address: String,
    /// The client certificate as Envoy sends it: URL-encoded PEM.
    pub peer_certificate: Option<String>,
    pub context_extensions: BTreeMap<String, String>,
}

/// Why a request could not be read.
#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
pub enum FactsError {
    #[error("request has no HTTP attributes")]
    NoHttpRequest,
    #[error("request has no method")]
    NoMethod,
    #[error("request has no path")]
    NoPath,
    #[error("request has more than {0} headers")]
    TooManyHeaders(usize),
    #[error("request headers are larger than {0} bytes")]
    HeadersTooLarge(usize),
    #[error("header \"{0}\" is not valid UTF-8")]
    HeaderEncoding(String),
    #[error("path is not in canonical form ({0})")]
    NonCanonicalPath(&'static str),
    #[error("headers {0} disagree about the original request")]
    ConflictingHeaders(String),
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

        let mut headers = BTreeMap::new();
        // `header_map` replaces `headers` when the filter sets `encode_raw_headers`.
        match &http.header_map {
            Some(map) if !map.headers.is_empty() => {
                for h in &map.headers {
                    budget.take(&h.key, h.value.len().saturating_add(h.raw_value.len()))?;
                    let value = if h.raw_value.is_empty() {
                        h.value.clone()
                    } else {
                        String::from_utf8(h.raw_value.clone())
                            .map_err(|_| FactsError::HeaderEncoding(h.key.clone()))?
                    };
                    headers
                        .entry(h.key.to_ascii_lowercase())
                        .and_modify(|v: &mut String| {
                            v.push(',');
                            v.push_str(&value);
                        })
                        .or_insert(value);
                }
            }
            _ => {
                // In name order, so that joined values do not depend on the map's order.
                let mut pairs: Vec<_> = http.headers.iter().collect();
                pairs.sort_unstable();
                for (k, v) in pairs {
                    budget.take(k, v.len())?;
                    // Envoy sends lower-case names; names differing only in case are one
                    // header, joined as Envoy joins repeats (never one silently dropped).
                    headers
                        .entry(k.to_ascii_lowercase())
                        .and_modify(|joined: &mut String| {
                            joined.push(',');
                            joined.push_str(v);
                        })
                        .or_insert_with(|| v.clone());
                }
            }
        }

        let pseudo = |name: &str| headers.get(name).cloned().unwrap_or_default();
        let method = non_empty(&http.method).unwrap_or_else(|| pseudo(":method"));
        if method.is_empty() {
            return Err(FactsError::NoMethod);
        }
        let raw_path = non_empty(&http.path).unwrap_or_else(|| pseudo(":path"));
        if raw_path.is_empty() {
            return Err(FactsError::NoPath);
        }
        let (path, mut query) = split_path(&raw_path)?;
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
        let mut budget = HeaderBudget {
            limits,
            count: 0,
            bytes: 0,
        };
        let mut map: BTreeMap<String, String> = BTreeMap::new();
        for (name, value) in headers {
            budget.take(&name, value.len())?;
            let name = name.to_ascii_lowercase();
            let value =
                String::from_utf8(value).map_err(|_| FactsError::HeaderEncoding(name.clone()))?;
            map.entry(name)
                .and_modify(|v| {
                    v.push(',');
                    v.push_str(&value);
                })
                .or_insert(value);
        }
        // SECURITY: when a proxy sets only one header of a list, a client could send
        // another one of it; so all that are present must agree.
        let agreed = |names: &[String]| -> Result<Option<String>, FactsError> {
            let mut values = names
                .iter()
                .filter_map(|n| map.get(n).filter(|v| !v.is_empty()));
            let first = values.next().cloned();
            if values.any(|v| Some(v) != first.as_ref()) {
                return Err(FactsError::ConflictingHeaders(names.join(", ")));
            }
            Ok(first)
        };
        let first = |names: &[String]| {
            names
                .iter()
                .find_map(|n| map.get(n).filter(|v| !v.is_empty()).cloned())
        };
        let method = agreed(&settings.method_headers)?.ok_or(FactsError::NoMethod)?;
        let uri = agreed(&settings.uri_headers)?.ok_or(FactsError::NoPath)?;
        // `Host` names Portcullis itself on a forwarded subrequest, so for the host the
        // first header present wins.
        let host = first(&settings.host_headers).unwrap_or_default();
        let scheme = agreed(&settings.proto_headers)?.unwrap_or_default();
        let (path, query) = split_path(&uri)?;
        let source_address = first(&settings.source_headers)
            // X-Forwarded-For: the left-most entry is the original client.
            .map(|v| v.split(',').next().unwrap_or_default().trim().to_string())
            .or_else(|| peer_address.map(|a| a.ip().to_string()))
            .unwrap_or_default();
        Ok(RequestFacts {
            request_id: map.get("x-request-id").cloned().unwrap_or_default(),
            method: method.to_ascii_uppercase(),
            path,
            query,
            host,
            scheme,
            source_address,
            headers: map,
            peer_certificate: None,
            context_extensions: BTreeMap::new(),
        })
    }
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
