//! The HTTP doors: forward-auth for nginx `auth_request`, Traefik `forwardAuth`, Caddy
//! `forward_auth` and Envoy's HTTP ext_authz; and the JSON check API (an Envoy CheckRequest
//! in proto3 JSON in, the CheckResponse in proto3 JSON out). Glue only: request facts in,
//! the engine's decision out.

use super::slots::Activity;
use crate::config::ForwardAuthSettings;
use crate::engine::{Engine, Question};
use crate::facts::RequestFacts;
use crate::proto::envoy::service::auth::v3::CheckRequest;
use axum::body::{Body, Bytes};
use axum::extract::{ConnectInfo, Request, State};
use axum::http::header::{CONNECTION, CONTENT_LENGTH, CONTENT_TYPE};
use axum::http::{HeaderMap, HeaderName, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::SystemTime;
use tokio_stream::StreamExt;

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
    let facts = facts(&headers, settings, Some(peer), engine.limits());
    let question = match &facts {
        Ok(facts) => Question::Facts(facts),
        Err(e) => Question::Unreadable(e.clone()),
    };
    let reply = engine.answer(question, SystemTime::now).await.http_reply();
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
/// A readable request always gets 200 with the decision inside; unreadable JSON gets 400,
/// a body over [`MAX_JSON_BYTES`] 413, and a body not received within
/// `[limits] http_body_timeout` 408 (and the connection is closed).
pub async fn json_check(State(engine): State<Arc<Engine>>, request: Request) -> Response {
    let (parts, body) = request.into_parts();
    // SECURITY: refused from its declared length, before a byte of it is read.
    let declared = parts
        .headers
        .get(CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|n| n > MAX_JSON_BYTES as u64) {
        return too_large();
    }
    let body = {
        // While the body arrives, the turn is the client's: a connection stalled here can
        // be evicted to make room for another (`slots.rs`).
        let _turn = parts
            .extensions
            .get::<Activity>()
            .map(Activity::client_turn);
        let limit = engine.limits().http_body_timeout;
        match tokio::time::timeout(limit, read_body(body, MAX_JSON_BYTES)).await {
            Ok(Ok(body)) => body,
            Ok(Err(BodyError::TooLarge)) => return too_large(),
            // The client went away or sent a broken body: nobody may be left to answer.
            Ok(Err(BodyError::Unreadable)) => return bad_request("body could not be read"),
            Err(_) => {
                engine.metrics().listener_event("http", "body_timeout");
                return body_timeout(limit);
            }
        }
    };
    let text = match std::str::from_utf8(&body) {
        Ok(t) => t,
        Err(_) => return bad_request("body is not UTF-8"),
    };
    let request: CheckRequest =
        match crate::proto::from_json("envoy.service.auth.v3.CheckRequest", text) {
            Ok(r) => r,
            Err(e) => return bad_request(&format!("not a CheckRequest in proto3 JSON: {e}")),
        };
    let response = engine
        .answer(Question::Check(&request), SystemTime::now)
        .await
        .check_response();
    match crate::proto::to_json("envoy.service.auth.v3.CheckResponse", &response) {
        Ok(json) => (
            StatusCode::OK,
            [(CONTENT_TYPE, "application/json")],
            json.to_string(),
        )
            .into_response(),
        // SECURITY: never an answer that could read as an allow.
        Err(_) => StatusCode::INTERNAL_SERVER_ERROR.into_response(),
    }
}

/// Why a request body could not be taken.
#[derive(Debug, PartialEq, Eq)]
enum BodyError {
    /// More than the cap.
    TooLarge,
    /// The connection failed or the body's framing was broken.
    Unreadable,
}

/// Reads a whole body, refusing it as soon as it exceeds `max` bytes.
async fn read_body(body: Body, max: usize) -> Result<Bytes, BodyError> {
    let mut stream = body.into_data_stream();
    let mut bytes = Vec::new();
    while let Some(chunk) = stream.next().await {
        let chunk = chunk.map_err(|_| BodyError::Unreadable)?;
        if chunk.len() > max.saturating_sub(bytes.len()) {
            return Err(BodyError::TooLarge);
        }
        bytes.extend_from_slice(&chunk);
    }
    Ok(Bytes::from(bytes))
}

fn too_large() -> Response {
    let body = serde_json::json!({
        "error": format!("body larger than {MAX_JSON_BYTES} bytes")
    })
    .to_string();
    (
        StatusCode::PAYLOAD_TOO_LARGE,
        [(CONTENT_TYPE, "application/json")],
        body,
    )
        .into_response()
}

/// 408, and the connection is closed: what the client may still send is not waited for.
fn body_timeout(limit: std::time::Duration) -> Response {
    let body = serde_json::json!({
        "error": format!(
            "body not received within {}",
            humantime::format_duration(limit)
        )
    })
    .to_string();
    (
        StatusCode::REQUEST_TIMEOUT,
        [(CONTENT_TYPE, "application/json"), (CONNECTION, "close")],
        body,
    )
        .into_response()
}

fn bad_request(message: &str) -> Response {
    let body = serde_json::json!({ "error": message }).to_string();
    (
        StatusCode::BAD_REQUEST,
        [(CONTENT_TYPE, "application/json")],
        body,
    )
        .into_response()
}
