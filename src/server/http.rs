//! The HTTP doors: forward-auth for nginx `auth_request`, Traefik `forwardAuth`, Caddy
//! `forward_auth` and Envoy's HTTP ext_authz; and the JSON check API (an Envoy CheckRequest
//! in proto3 JSON in, the CheckResponse in proto3 JSON out). Glue only: request facts in,
//! the engine's decision out.

use crate::config::ForwardAuthSettings;
use crate::decision::{check_response, http_reply};
use crate::engine::Engine;
use crate::facts::RequestFacts;
use crate::proto::envoy::service::auth::v3::CheckRequest;
use axum::body::Bytes;
use axum::extract::{ConnectInfo, State};
use axum::http::{HeaderMap, HeaderName, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::SystemTime;

/// Largest JSON CheckRequest accepted.
pub const MAX_JSON_BYTES: usize = 1024 * 1024;

/// `ANY <forward_auth.path>`: decides the original request described by the headers.
pub async fn forward_auth(
    State(engine): State<Arc<Engine>>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    headers: HeaderMap,
) -> Response {
    let Some(settings) = engine.forward_auth() else {
        return StatusCode::NOT_FOUND.into_response();
    };
    let decision = match facts(&headers, settings, Some(peer), engine.limits()) {
        Ok(facts) => engine.decide_with_refresh(&facts, SystemTime::now).await,
        Err(e) => engine.unreadable(e),
    };
    engine.observe(&decision);
    let reply = http_reply(&decision, engine.reply_settings());
    let mut response = (
        StatusCode::from_u16(reply.status).unwrap_or(StatusCode::FORBIDDEN),
        reply.body,
    )
        .into_response();
    for (k, v) in reply.headers {
        if let (Ok(k), Ok(v)) = (HeaderName::try_from(k), HeaderValue::try_from(v)) {
            response.headers_mut().insert(k, v);
        }
    }
    response
}

fn facts(
    headers: &HeaderMap,
    settings: &ForwardAuthSettings,
    peer: Option<SocketAddr>,
    limits: &crate::config::Limits,
) -> Result<RequestFacts, crate::facts::FactsError> {
    let pairs = headers
        .iter()
        .map(|(k, v)| (k.as_str().to_string(), v.as_bytes().to_vec()));
    RequestFacts::from_forwarded(pairs, settings, peer, limits)
}

/// `POST /v1/check`: a CheckRequest in proto3 JSON; the CheckResponse in proto3 JSON.
/// A readable request always gets 200 with the decision inside; unreadable JSON gets 400.
pub async fn json_check(State(engine): State<Arc<Engine>>, body: Bytes) -> Response {
    let text = match std::str::from_utf8(&body) {
        Ok(t) => t,
        Err(_) => return bad_request("body is not UTF-8"),
    };
    let request: CheckRequest =
        match crate::proto::from_json("envoy.service.auth.v3.CheckRequest", text) {
            Ok(r) => r,
            Err(e) => return bad_request(&format!("not a CheckRequest in proto3 JSON: {e}")),
        };
    let decision = engine.check_with_refresh(&request, SystemTime::now).await;
    engine.observe(&decision);
    let response = check_response(&decision, engine.reply_settings());
    match crate::proto::to_json("envoy.service.auth.v3.CheckResponse", &response) {
        Ok(json) => (
            StatusCode::OK,
            [(axum::http::header::CONTENT_TYPE, "application/json")],
            json.to_string(),
        )
            .into_response(),
        // SECURITY: never an answer that could read as an allow.
        Err(_) => StatusCode::INTERNAL_SERVER_ERROR.into_response(),
    }
}

fn bad_request(message: &str) -> Response {
    let body = serde_json::json!({ "error": message }).to_string();
    (
        StatusCode::BAD_REQUEST,
        [(axum::http::header::CONTENT_TYPE, "application/json")],
        body,
    )
        .into_response()
}
