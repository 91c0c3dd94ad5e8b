//! Explanations for `portcullis check`: a CheckRequest in proto3 JSON in; the identities
//! found, each rejection, the Cedar request, the decision, its determining policies and
//! the exact reply out, as text for a person.

use crate::engine::{Decision, DenyReason, Engine};
use crate::identity::{PeerOutcome, TokenOutcome};
use crate::proto::envoy::service::auth::v3::CheckRequest;
use crate::reply::check_response;
use std::fmt::Write as _;
use std::time::SystemTime;

/// The outcome of explaining one request.
pub struct Explanation {
    /// Whether the request would be let through.
    pub allowed: bool,
    /// The explanation, for a person.
    pub text: String,
}

/// Decides a CheckRequest given as proto3 JSON and explains the decision; `detailed` adds
/// the Cedar request with its context, and the exact reply. The decision is made at the
/// at `at` when given, else at the request's `attributes.request.time` when it has one, else at
/// `now`.
pub fn check_json(
    engine: &Engine,
    json: &str,
    now: SystemTime,
    at: Option<SystemTime>,
    detailed: bool,
) -> Result<Explanation, String> {
    let request: CheckRequest = crate::proto::from_json("envoy.service.auth.v3.CheckRequest", json)
        .map_err(|e| format!("not a CheckRequest in proto3 JSON: {e}"))?;
    Ok(check(engine, &request, now, at, detailed))
}

/// Decides a CheckRequest and explains the decision, as [`check_json`]: at the request's
/// own `attributes.request.time` when it has one, else at `now`; at `at` when given.
pub fn check(
    engine: &Engine,
    request: &CheckRequest,
    now: SystemTime,
    at: Option<SystemTime>,
    detailed: bool,
) -> Explanation {
    // A captured request is decided as of its own time (Envoy's `attributes.request.time`)
    // when it has one: token expiry and `context.time` alike. Only this offline check reads
    // it; a server decides at its own clock.
    let now = request
        .attributes
        .as_ref()
        .and_then(|a| a.request.as_ref())
        .and_then(|r| r.time)
        .and_then(|t| {
            let secs = u64::try_from(t.seconds).ok()?;
            let nanos = u32::try_from(t.nanos).ok()?;
            SystemTime::UNIX_EPOCH.checked_add(std::time::Duration::new(secs, nanos))
        })
        .unwrap_or(now);
    // `check --at`: the time asked for, whatever the request says.
    let now = at.unwrap_or(now);
    let decision = engine.check(request, now);
    let response = check_response(&decision, engine.reply_settings());
    let mut reply = crate::proto::to_json("envoy.service.auth.v3.CheckResponse", &response)
        .unwrap_or_else(|e| serde_json::Value::from(format!("(cannot show the reply: {e})")));
    // proto3 JSON leaves out zero values, so an OK status would show as `"status": {}`;
    // a person reading the reply should see the code (and the docs show it).
    if let Some(status) = reply.get_mut("status").and_then(|s| s.as_object_mut()) {
        status.entry("code").or_insert(serde_json::Value::from(0));
    }
    let mut text = explain(&decision, detailed);
    if detailed {
        let _ = write!(
            text,
            "\nreply (CheckResponse):\n{}",
            serde_json::to_string_pretty(&reply).unwrap_or_default()
        );
    }
    Explanation {
        allowed: decision.allowed(),
        text,
    }
}

/// A denial as the client sees it: the HTTP status and the code, and for a 401 for lack
/// of any credential, that case in words (`DENY 401 no_permit (no credential was
/// presented)` against `DENY 403 no_permit`).
fn denial(r: &DenyReason) -> String {
    let status = crate::reply::deny_reply(r).http_status;
    let case = if matches!(r, DenyReason::NoPermit { anonymous: true }) {
        " (no credential was presented)"
    } else {
        ""
    };
    format!("{status} {}{case}", r.code())
}

/// The decision as text; `detailed` adds the Cedar request and its context.
pub fn explain(d: &Decision, detailed: bool) -> String {
    let mut s = String::new();
    if let Some(identity) = &d.identity {
        let peer = match &identity.peer {
            PeerOutcome::NotPresented => "none presented".to_string(),
            PeerOutcome::NotConfigured => {
                "presented, but no [peer] trust bundle is configured: ignored".into()
            }
            PeerOutcome::Rejected(e) => format!("REJECTED: {e}"),
            PeerOutcome::Verified(p) => format!(
                "verified: {} (subject \"{}\", issuer \"{}\", x5t#S256 {})",
                p.workload_id(),
                p.subject(),
                p.issuer(),
                p.thumbprint()
            ),
        };
        let token = match &identity.token {
            TokenOutcome::NotPresented => "none presented".to_string(),
            TokenOutcome::Rejected(e) => format!("REJECTED: {e}"),
            TokenOutcome::Verified(t) => format!(
                "verified: sub \"{}\" from \"{}\"{}",
                t.subject(),
                t.issuer(),
                if t.bound() {
                    ", bound to the presented certificate (RFC 8705)"
                } else {
                    ""
                }
            ),
        };
        let _ = writeln!(s, "certificate: {peer}");
        let _ = writeln!(s, "token:       {token}");
    }
    if let Some(p) = d.policy.as_ref().filter(|_| detailed) {
        let r = &p.request;
        let parents: Vec<String> = r
            .principal_parents()
            .iter()
            .map(ToString::to_string)
            .collect();
        let _ = writeln!(s, "cedar request:");
        let _ = writeln!(
            s,
            "  principal: {}{}",
            r.principal,
            if parents.is_empty() {
                String::new()
            } else {
                format!(" in [{}]", parents.join(", "))
            }
        );
        let _ = writeln!(s, "  action:    {}", r.action);
        let _ = writeln!(s, "  resource:  {}", r.resource);
        let _ = writeln!(
            s,
            "  context:   {}",
            serde_json::to_string_pretty(&r.context())
                .unwrap_or_default()
                .replace('\n', "\n  ")
        );
    }
    let verdict = match (&d.denial, d.dry_run) {
        (None, _) => "ALLOW".to_string(),
        (Some(r), true) => format!("ALLOW (dry-run; would deny: {})", denial(r)),
        (Some(r), false) => format!("DENY {}", denial(r)),
    };
    let _ = writeln!(s, "decision:    {verdict}");
    let policies = d.policies();
    if policies.is_empty() {
        if d.policy.is_some() && d.denial.is_some() {
            let _ = writeln!(s, "policies:    none determining (no permit matched)");
        }
    } else {
        let _ = writeln!(s, "policies:    {}", policies.join(", "));
    }
    for reason in &d.reasons {
        let _ = writeln!(s, "reason:      {reason}");
    }
    s
}
