//! Decision to wire reply: the only writer of response protos. Every denial becomes a
//! successful RPC carrying a non-zero status and a `denied_response`, because Envoy turns
//! RPC errors into allows under `failure_mode_allow`.

use crate::config::ResponseSettings;
use crate::engine::{Answer, Decision, DenyReason};
use crate::proto::envoy::config::core::v3::{
    HeaderValue, HeaderValueOption, header_value_option::HeaderAppendAction,
};
use crate::proto::envoy::service::auth::v3::{
    CheckResponse, DeniedHttpResponse, OkHttpResponse, check_response::HttpResponse,
};
use crate::proto::envoy::r#type::v3::HttpStatus;
use crate::proto::google::rpc::Status;
use prost_types::{ListValue, Struct, Value, value::Kind};

/// gRPC status codes used in `CheckResponse.status` (google.rpc.Code).
pub mod code {
    pub const OK: i32 = 0;
    pub const INVALID_ARGUMENT: i32 = 3;
    pub const DEADLINE_EXCEEDED: i32 = 4;
    pub const PERMISSION_DENIED: i32 = 7;
    pub const UNAVAILABLE: i32 = 14;
    pub const UNAUTHENTICATED: i32 = 16;
}

/// The header that carries the decision id, on allows and denials.
pub const DECISION_ID_HEADER: &str = "x-portcullis-decision-id";
/// The header set upstream on a dry-run denial (a denial let through).
pub const DRY_RUN_HEADER: &str = "x-portcullis-dry-run";
const REALM: &str = "Bearer realm=\"portcullis\"";

/// How a denial is answered: gRPC status, HTTP status, `WWW-Authenticate` and body.
pub struct DenyReply {
    pub grpc_code: i32,
    pub http_status: u16,
    pub www_authenticate: Option<&'static str>,
    pub body: &'static str,
}

/// The one mapping from a reason to a reply. No wildcard arm: a new reason cannot
/// compile without its reply.
pub fn deny_reply(reason: &DenyReason) -> DenyReply {
    let unauthenticated = |www| DenyReply {
        grpc_code: code::UNAUTHENTICATED,
        http_status: 401,
        www_authenticate: Some(www),
        body: "unauthorized\n",
    };
    let forbidden = DenyReply {
        grpc_code: code::PERMISSION_DENIED,
        http_status: 403,
        www_authenticate: None,
        body: "forbidden\n",
    };
    match reason {
        DenyReason::UnreadableRequest(_) | DenyReason::RequestTooLarge => DenyReply {
            grpc_code: code::INVALID_ARGUMENT,
            http_status: 400,
            www_authenticate: None,
            body: "bad request\n",
        },
        // RFC 6750 §3.1: no error code when the request lacked authentication.
        DenyReason::CertificateRequired
        | DenyReason::Certificate(_)
        | DenyReason::NoPermit { anonymous: true } => unauthenticated(REALM),
        DenyReason::Token(_) => {
            unauthenticated("Bearer realm=\"portcullis\", error=\"invalid_token\"")
        }
        DenyReason::NoPermit { anonymous: false }
        | DenyReason::Forbidden
        | DenyReason::PolicyError => forbidden,
        // Denied without a verdict on the request: the client may retry later.
        DenyReason::Overloaded => DenyReply {
            grpc_code: code::UNAVAILABLE,
            http_status: 503,
            www_authenticate: None,
            body: "overloaded\n",
        },
        // Denied because the decision could not be recorded: the sink may recover.
        DenyReason::AuditUnavailable => DenyReply {
            grpc_code: code::UNAVAILABLE,
            http_status: 503,
            www_authenticate: None,
            body: "audit log unavailable\n",
        },
        DenyReason::Deadline => DenyReply {
            grpc_code: code::DEADLINE_EXCEEDED,
            http_status: 503,
            www_authenticate: None,
            body: "authorization timed out\n",
        },
    }
}

/// Keeps a header value to visible ASCII; anything else is percent-encoded.
pub fn header_safe(value: &str) -> String {
    let mut out = String::with_capacity(value.len());
    for b in value.bytes() {
        if (0x20..0x7f).contains(&b) && b != b'%' {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

fn header(key: &str, value: String) -> HeaderValueOption {
    HeaderValueOption {
        header: Some(HeaderValue {
            key: key.to_string(),
            value,
            raw_value: Vec::new(),
        }),
        // `append` stays unset: OVERWRITE_IF_EXISTS_OR_ADD overwrites on old and new Envoy,
        // so a client cannot smuggle its own value for these headers upstream.
        append: None,
        append_action: HeaderAppendAction::OverwriteIfExistsOrAdd as i32,
        keep_empty_value: false,
    }
}

fn string_value(s: &str) -> Value {
    Value {
        kind: Some(Kind::StringValue(s.to_string())),
    }
}

fn metadata(decision: &Decision) -> Struct {
    let mut fields = std::collections::BTreeMap::new();
    fields.insert("decision_id".to_string(), string_value(&decision.id));
    if let Some(p) = decision.principal() {
        fields.insert("principal".to_string(), string_value(&p));
    }
    fields.insert(
        "policies".to_string(),
        Value {
            kind: Some(Kind::ListValue(ListValue {
                values: decision
                    .policies()
                    .iter()
                    .map(|p| string_value(p))
                    .collect(),
            })),
        },
    );
    fields.insert(
        "decision".to_string(),
        string_value(if decision.denial.is_none() {
            "allow"
        } else {
            "deny"
        }),
    );
    Struct {
        fields: fields.into_iter().collect(),
    }
}

impl Answer<'_> {
    /// The answer as Envoy's ext_authz reply: a successful RPC whose status is OK for an
    /// allow, and for a deny the denial's gRPC code with a `denied_response`.
    pub fn check_response(&self) -> CheckResponse {
        check_response(self.decision(), self.settings)
    }

    /// The answer as a plain HTTP reply (forward-auth; an embedding proxy): 200 with the
    /// identity headers to send upstream, or the denial's status, headers and body.
    pub fn http_reply(&self) -> HttpReply {
        http_reply(self.decision(), self.settings)
    }
}

/// The Envoy reply for a decision.
pub fn check_response(decision: &Decision, settings: &ResponseSettings) -> CheckResponse {
    let dynamic_metadata = Some(metadata(decision));
    match &decision.denial {
        Some(reason) if !decision.dry_run => {
            let reply = deny_reply(reason);
            let mut headers = vec![header(DECISION_ID_HEADER, decision.id.clone())];
            if let Some(www) = reply.www_authenticate {
                headers.push(header("www-authenticate", www.to_string()));
            }
            CheckResponse {
                status: Some(Status {
                    code: reply.grpc_code,
                    message: reason.code().to_string(),
                    details: Vec::new(),
                }),
                http_response: Some(HttpResponse::DeniedResponse(DeniedHttpResponse {
                    status: Some(HttpStatus {
                        code: i32::from(reply.http_status),
                    }),
                    headers,
                    body: reply.body.to_string(),
                })),
                dynamic_metadata,
            }
        }
        _ => {
            let mut headers = Vec::new();
            let mut headers_to_remove = Vec::new();
            match decision.principal() {
                Some(principal) => {
                    headers.push(header(&settings.principal_header, header_safe(&principal)))
                }
                // Dry-run, denied before any policy ran: there is no principal. SECURITY:
                // the client's own header of that name is removed, not overwritten with an
                // empty value (which some Envoy versions drop, leaving the client's copy).
                None => headers_to_remove.push(settings.principal_header.clone()),
            }
            let identity = decision.identity.as_ref();
            let token = identity.and_then(|i| i.token());
            // Only the deciding token's own issuer fills claim headers.
            let own = token
                .and_then(|t| settings.claim_headers.get(t.issuer()))
                .map_or(&[][..], Vec::as_slice);
            // The claims are kept as text: parsed once for all the claim headers.
            let mut claims = match (token, own.is_empty()) {
                (Some(t), false) => t.claims(),
                _ => serde_json::Map::new(),
            };
            for (name, claim) in own {
                let value = match claims.remove(claim) {
                    Some(serde_json::Value::String(s)) => Some(s),
                    Some(v @ (serde_json::Value::Number(_) | serde_json::Value::Bool(_))) => {
                        Some(v.to_string())
                    }
                    _ => None,
                };
                if let Some(v) = value {
                    headers.push(header(name, header_safe(&v)));
                }
            }
            // SECURITY: a client-sent header of a claim header's name must not reach
            // upstream looking as if Portcullis (or another issuer) had vouched for it.
            for name in &settings.claim_header_names {
                if !headers
                    .iter()
                    .any(|h| h.header.as_ref().is_some_and(|h| &h.key == name))
                {
                    headers_to_remove.push(name.clone());
                }
            }
            // SECURITY: in dry-run a request whose token was refused is let through; the
            // refused token must not travel on as if it had been accepted.
            let refused_token = identity
                .is_some_and(|i| matches!(i.token, crate::identity::TokenOutcome::Rejected(_)));
            if settings.strip_authorization || refused_token {
                headers_to_remove.push("authorization".to_string());
                headers_to_remove.extend(settings.token_header.iter().cloned());
            }
            if refused_token && settings.token_cookie.is_some() {
                // The refused token may have been the cookie; the header cannot be edited
                // pair by pair, so it goes whole (dry-run only).
                headers_to_remove.push("cookie".to_string());
            }
            if let Some(reason) = &decision.denial {
                headers.push(header(
                    DRY_RUN_HEADER,
                    format!("would-deny: {}", reason.code()),
                ));
            }
            CheckResponse {
                status: Some(Status {
                    code: code::OK,
                    message: String::new(),
                    details: Vec::new(),
                }),
                http_response: Some(HttpResponse::OkResponse(OkHttpResponse {
                    headers,
                    headers_to_remove,
                    ..Default::default()
                })),
                dynamic_metadata,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn header_values_are_made_safe() {
        assert_eq!(header_safe("User::\"alice\""), "User::\"alice\"");
        assert_eq!(header_safe("a\r\nb%"), "a%0D%0Ab%25");
        assert_eq!(header_safe("é"), "%C3%A9");
    }

    #[test]
    fn token_failures_say_invalid_token() {
        let r = deny_reply(&DenyReason::Token(crate::identity::TokenRejection::Expired));
        assert_eq!((r.grpc_code, r.http_status), (code::UNAUTHENTICATED, 401));
        assert!(
            r.www_authenticate
                .unwrap()
                .contains("error=\"invalid_token\"")
        );
        let r = deny_reply(&DenyReason::NoPermit { anonymous: true });
        assert_eq!(r.http_status, 401);
        assert!(!r.www_authenticate.unwrap().contains("error="));
        let r = deny_reply(&DenyReason::Forbidden);
        assert_eq!(
            (r.grpc_code, r.http_status, r.www_authenticate),
            (code::PERMISSION_DENIED, 403, None)
        );
    }
}

/// A decision as a plain HTTP answer, for the forward-auth door.
#[non_exhaustive]
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HttpReply {
    /// 200 for an allow; the denial's status (401, 403, 400, 503...) otherwise.
    pub status: u16,
    /// On an allow, the headers to set on the request upstream, replacing whatever copies
    /// the client sent; on a denial, the headers of the reply.
    pub headers: Vec<(String, String)>,
    /// On an allow, the headers to remove from the request before it goes upstream: the
    /// identity headers Portcullis did not set this time (a client's forged copy must not
    /// pass) and, when configured, the credential headers. Empty on a denial.
    pub remove: Vec<String>,
    /// The body of a denial's reply; empty on an allow.
    pub body: String,
}

/// The forward-auth reply: 200 with the identity headers a proxy copies upstream
/// (nginx `auth_request_set`, Traefik `authResponseHeaders`), or the denial's status,
/// `WWW-Authenticate` and body. Derived from [`check_response`], so both doors agree.
pub fn http_reply(decision: &Decision, settings: &ResponseSettings) -> HttpReply {
    let headers = |opts: &[HeaderValueOption]| -> Vec<(String, String)> {
        opts.iter()
            .filter_map(|o| o.header.as_ref())
            .map(|h| (h.key.clone(), h.value.clone()))
            .collect()
    };
    match check_response(decision, settings).http_response {
        Some(HttpResponse::OkResponse(ok)) => {
            let mut h = headers(&ok.headers);
            h.push((DECISION_ID_HEADER.to_string(), decision.id.clone()));
            HttpReply {
                status: 200,
                headers: h,
                remove: ok.headers_to_remove,
                body: String::new(),
            }
        }
        Some(HttpResponse::DeniedResponse(denied) | HttpResponse::ErrorResponse(denied)) => {
            HttpReply {
                status: denied
                    .status
                    .and_then(|s| u16::try_from(s.code).ok())
                    .filter(|c| (400..600).contains(c))
                    .unwrap_or(403),
                headers: headers(&denied.headers),
                remove: Vec::new(),
                body: denied.body,
            }
        }
        // SECURITY: check_response always sets a response; if it ever did not, deny.
        None => HttpReply {
            status: 403,
            headers: Vec::new(),
            remove: Vec::new(),
            body: "forbidden\n".into(),
        },
    }
}
