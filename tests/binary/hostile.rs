//! Hostile input against the real binary (GitHub issue 7): oversized and deeply nested
//! inputs, malformed protobuf, slow and abandoned connections, many concurrent streams,
//! garbage in every field, and the `[limits]` that bound them. Every hostile request gets a
//! deny, or an RPC error only where no CheckRequest could be read; after each, another
//! client is still answered correctly, the process is still alive, and its memory stays
//! bounded.

use crate::common;

use base64::Engine as _;
use common::binary::{Binary, connect};
use common::keyserver::{KeyServer, Mode, SLOW_ISSUER};
use common::{
    AUDIENCE, Authority, ClientCert, ISSUER, LeafSpec, READER, TokenSigner, ok_header, outcome,
    request, set_header,
};
use http_body_util::{BodyExt, Full, StreamBody};
use hyper::body::{Bytes, Frame};
use hyper_util::rt::{TokioExecutor, TokioIo};
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use portcullis::proto::envoy::config::core::v3::{
    Address, HeaderMap, HeaderValue, Metadata, SocketAddress, address, socket_address,
};
use portcullis::proto::envoy::service::auth::v3::authorization_client::AuthorizationClient;
use portcullis::proto::envoy::service::auth::v3::{
    AttributeContext, CheckRequest, CheckResponse, attribute_context,
};
use prost::Message;
use serde_json::{Value, json};
use std::net::SocketAddr;
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tonic::transport::Channel;

const VALID_PATH: &str = "/api/orders/1";
const WORKLOAD_PATH: &str = "/internal/status";
const ALICE: &str = "User::\"alice\"";
const PRINCIPAL_HEADER: &str = "x-portcullis-principal";
const CHECK_PATH: &str = "/envoy.service.auth.v3.Authorization/Check";
const MIB: usize = 1024 * 1024;
/// How long a valid request from another client may take while the server is under attack.
const ANSWER_BOUND: Duration = Duration::from_secs(2);

// ---------------------------------------------------------------------------------------
// The test world: throwaway material, the real binary, a valid request.
// ---------------------------------------------------------------------------------------

/// Certificates, keys and tokens generated once for the whole file.
struct Material {
    root: Authority,
    inter: Authority,
    signer: TokenSigner,
    reader: ClientCert,
    /// A client certificate for the reader's SPIFFE ID from a CA nobody trusts.
    foreign: ClientCert,
    /// A reader certificate that expired yesterday.
    expired: ClientCert,
    /// A valid token for alice (unbound, ES256, kid "es").
    alice: String,
    /// Tokens that must each be rejected, whatever else the request carries.
    bad_tokens: Vec<(&'static str, String)>,
}

fn b64(bytes: &[u8]) -> String {
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes)
}

fn material() -> &'static Material {
    static M: OnceLock<Material> = OnceLock::new();
    M.get_or_init(|| {
        let root = Authority::root("hostile test root CA");
        let inter = root.intermediate("hostile test intermediate CA");
        let other = Authority::root("hostile foreign CA");
        let signer = TokenSigner::generate(Algorithm::ES256, "es");
        let reader = inter.issue(&LeafSpec::spiffe(READER));
        let foreign = other.issue(&LeafSpec::spiffe(READER));
        let mut spec = LeafSpec::spiffe(READER);
        spec.not_before = time::OffsetDateTime::now_utc() - time::Duration::days(3);
        spec.not_after = time::OffsetDateTime::now_utc() - time::Duration::days(1);
        let expired = inter.issue(&spec);
        let alice = signer.sign(&common::claims());

        let claims = common::claims();
        let with = |k: &str, v: Value| {
            let mut c = common::claims();
            c[k] = v;
            c
        };
        let mut bad = Vec::new();
        bad.push((
            "alg none",
            format!(
                "{}.{}.",
                b64(br#"{"alg":"none","typ":"JWT"}"#),
                b64(claims.to_string().as_bytes())
            ),
        ));
        bad.push((
            "HS256 with the public key as secret",
            jsonwebtoken::encode(
                &{
                    let mut h = Header::new(Algorithm::HS256);
                    h.kid = Some("es".into());
                    h
                },
                &claims,
                &EncodingKey::from_secret(signer.public_key_pem().as_bytes()),
            )
            .expect("sign HS256"),
        ));
        bad.push((
            "unknown kid",
            TokenSigner::generate(Algorithm::ES256, "nobody").sign(&claims),
        ));
        bad.push((
            "right kid, wrong key",
            TokenSigner::generate(Algorithm::ES256, "es").sign(&claims),
        ));
        bad.push((
            "expired",
            signer.sign(&with("exp", json!(common::now() - 3600))),
        ));
        bad.push(("wrong audience", signer.sign(&with("aud", json!("other")))));
        bad.push((
            "unknown issuer",
            signer.sign(&with("iss", json!("https://evil.test"))),
        ));
        bad.push(("empty subject", signer.sign(&with("sub", json!("")))));
        bad.push(("numeric subject", signer.sign(&with("sub", json!(7)))));
        bad.push((
            "lifetime too long",
            signer.sign(&with("exp", json!(common::now() + 86_400 * 30))),
        ));
        bad.push((
            "bound to another certificate",
            signer.sign(&with("cnf", json!({ "x5t#S256": foreign.thumbprint() }))),
        ));
        bad.push(("crit header", {
            let mut h = Header::new(Algorithm::ES256);
            h.kid = Some("es".into());
            h.crit = Some(vec!["exp".into()]);
            signer.sign_with(&h, &claims)
        }));
        let parts: Vec<&str> = alice.split('.').collect();
        let mut sig = parts[2].to_string();
        let mid = sig.len() / 2;
        let flipped = if &sig[mid..mid + 1] == "A" { "B" } else { "A" };
        sig.replace_range(mid..mid + 1, flipped);
        bad.push((
            "tampered signature",
            format!("{}.{}.{sig}", parts[0], parts[1]),
        ));
        bad.push((
            "payload swapped",
            format!(
                "{}.{}.{}",
                parts[0],
                b64(with("sub", json!("mallory")).to_string().as_bytes()),
                parts[2]
            ),
        ));
        bad.push((
            "header nested 1000 deep",
            format!(
                "{}.{}.{}",
                b64(format!(
                    r#"{{"alg":"ES256","kid":"es","x":{}{}}}"#,
                    "[".repeat(1000),
                    "]".repeat(1000)
                )
                .as_bytes()),
                parts[1],
                parts[2]
            ),
        ));
        bad.push((
            "header not JSON",
            format!("{}.{}.{}", b64(b"\xff\xfe{"), parts[1], parts[2]),
        ));
        bad.push(("two tokens joined", format!("{alice}{alice}")));
        bad.push(("three dots", "...".into()));
        bad.push(("a.b.c", "a.b.c".into()));
        bad.push((
            "huge base64 (under the size cap)",
            format!(
                "{}.{}.{}",
                "A".repeat(2500),
                "B".repeat(2500),
                "C".repeat(2500)
            ),
        ));
        bad.push((
            "over the size cap",
            format!(
                "{}.{}.{}",
                "A".repeat(3000),
                "B".repeat(3000),
                "C".repeat(3000)
            ),
        ));
        Material {
            root,
            inter,
            signer,
            reader,
            foreign,
            expired,
            alice,
            bad_tokens: bad,
        }
    })
}

fn valid_request() -> CheckRequest {
    request("GET", VALID_PATH, None, Some(&material().alice))
}

// Checks of this file on the shared harness's server (`common::binary::Binary`).
impl Binary {
    /// A valid request from another, fresh client is answered correctly and in time, and
    /// the process is still alive.
    async fn assert_serves(&self, after: &str) {
        self.assert_alive();
        let started = Instant::now();
        let mut client = self.client().await;
        let resp = try_check(&mut client, valid_request())
            .await
            .unwrap_or_else(|e| panic!("after {after}: a valid request failed: {e:?}"));
        let took = started.elapsed();
        assert_eq!(
            outcome(&resp).0,
            0,
            "after {after}: a valid request was denied: {:?}",
            outcome(&resp)
        );
        assert_eq!(ok_header(&resp, PRINCIPAL_HEADER).as_deref(), Some(ALICE));
        assert!(
            took < ANSWER_BOUND,
            "after {after}: a valid request took {took:?}"
        );
        self.assert_alive();
    }

    /// How many audit lines carry `reason`, once the count reaches `expected` (audit lines
    /// are written by a background thread) or after 5 s.
    async fn audit_count(&self, reason: &str, expected: usize) -> usize {
        let count = || {
            std::fs::read_to_string(self.path("audit.log"))
                .unwrap_or_default()
                .lines()
                .filter_map(|l| serde_json::from_str::<Value>(l).ok())
                .filter(|v| v["reason"].as_str() == Some(reason))
                .count()
        };
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            let n = count();
            if n >= expected || Instant::now() > deadline {
                return n;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

async fn try_check(
    client: &mut AuthorizationClient<Channel>,
    req: CheckRequest,
) -> Result<CheckResponse, tonic::Status> {
    let mut r = tonic::Request::new(req);
    r.set_timeout(Duration::from_secs(15));
    client.check(r).await.map(tonic::Response::into_inner)
}

/// A server over the shared material, with `extra` appended to its configuration and
/// `files` written next to it.
fn server_with(extra: &str, files: &[(&str, String)]) -> Binary {
    server_with_peer("", extra, files)
}

/// [`server_with`], with `peer_extra` added to its `[peer]` table.
fn server_with_peer(peer_extra: &str, extra: &str, files: &[(&str, String)]) -> Binary {
    let m = material();
    let dir = tempfile::tempdir().expect("temp dir");
    let p = dir.path();
    std::fs::write(p.join("ca.pem"), m.root.cert_pem()).unwrap();
    std::fs::write(p.join("intermediate.pem"), m.inter.cert_pem()).unwrap();
    std::fs::write(
        p.join("idp.jwks.json"),
        portcullis::demo::jwks(&[&m.signer]),
    )
    .unwrap();
    std::fs::create_dir(p.join("policies")).unwrap();
    std::fs::write(p.join("policies/test.cedar"), common::POLICIES).unwrap();
    for (name, content) in files {
        std::fs::write(p.join(name), content).unwrap();
    }
    let config = format!(
        r#"
[server]
grpc = "127.0.0.1:0"
http = "127.0.0.1:0"

[peer]
trust_bundle = "ca.pem"
intermediates = "intermediate.pem"
trust_domains = ["example.org"]
{peer_extra}

[[issuer]]
issuer = "{ISSUER}"
audiences = ["{AUDIENCE}"]
jwks_file = "idp.jwks.json"
algorithms = ["ES256", "RS256", "EdDSA"]
max_lifetime = "1h"

[policy]
dir = "policies"

[log]
audit = "audit.log"
{extra}
"#
    );
    Binary::start_in(dir, &config)
}

fn server(extra: &str) -> Binary {
    server_with(extra, &[])
}

fn http_mut(req: &mut CheckRequest) -> &mut attribute_context::HttpRequest {
    req.attributes
        .as_mut()
        .and_then(|a| a.request.as_mut())
        .and_then(|r| r.http.as_mut())
        .expect("a request built by `request`")
}

fn attrs_mut(req: &mut CheckRequest) -> &mut AttributeContext {
    req.attributes.as_mut().expect("attributes")
}

/// Header count and bytes as the server counts them: names plus values.
fn header_budget(req: &CheckRequest) -> (usize, usize) {
    let http = req
        .attributes
        .as_ref()
        .and_then(|a| a.request.as_ref())
        .and_then(|r| r.http.as_ref())
        .expect("http");
    (
        http.headers.len(),
        http.headers.iter().map(|(k, v)| k.len() + v.len()).sum(),
    )
}

fn assert_denied_400(resp: &CheckResponse, what: &str) {
    assert_eq!(
        outcome(resp),
        (3, 400, None),
        "{what}: expected a 400 deny (unreadable_request)"
    );
}

// ---------------------------------------------------------------------------------------
// Oversized messages and the header limits.
// ---------------------------------------------------------------------------------------

/// A valid request padded with one `x-pad` header so that it encodes to exactly `size` bytes.
fn request_of_size(size: usize) -> CheckRequest {
    let mut pad = size.saturating_sub(valid_request().encoded_len() + 32);
    for _ in 0..8 {
        let mut req = valid_request();
        set_header(&mut req, "x-pad", "p".repeat(pad));
        let len = req.encoded_len();
        if len == size {
            return req;
        }
        pad = (pad + size).checked_sub(len).expect("padding fits");
    }
    panic!("cannot pad a request to {size} bytes");
}

// Issue 12, finding 9: a CheckRequest over max_message_bytes was an RPC error, which Envoy
// turns into an allow under `failure_mode_allow: true`. Up to the transport's hard cap (four
// times max_message_bytes) it is now a deny reply (`request_too_large`, 400); only beyond
// the hard cap, where nothing could be read, is it still an RPC error (documented next to
// failure_mode_allow).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversized_messages_are_denied_up_to_the_hard_cap_and_header_limits_deny_400() {
    let server = server("");
    let mut client = server.client().await;

    // Over max_message_bytes (default 1 MiB), up to the hard cap (4 MiB): a deny reply.
    for size in [MIB + 1, MIB + 4096, 3 * MIB, 4 * MIB] {
        let resp = try_check(&mut client, request_of_size(size))
            .await
            .unwrap_or_else(|e| panic!("{size} bytes: an RPC error: {e:?}"));
        assert_denied_400(&resp, &format!("a {size}-byte message"));
        assert_eq!(
            resp.status.as_ref().map(|s| s.message.as_str()),
            Some("request_too_large"),
            "{size} bytes"
        );
        server
            .assert_serves(&format!("a {size}-byte message"))
            .await;
    }
    // Beyond the hard cap no CheckRequest could be read, so the RPC fails.
    for size in [4 * MIB + 1, 6 * MIB] {
        let err = try_check(&mut client, request_of_size(size))
            .await
            .expect_err("a CheckRequest over the hard cap was read");
        assert!(
            matches!(
                err.code(),
                tonic::Code::OutOfRange | tonic::Code::ResourceExhausted
            ),
            "{size} bytes: {err:?}"
        );
        server
            .assert_serves(&format!("a {size}-byte message"))
            .await;
    }

    // Exactly max_message_bytes is read; its 1 MiB header is over max_header_bytes: 400.
    let resp = try_check(&mut client, request_of_size(MIB))
        .await
        .expect("a message of exactly max_message_bytes is read");
    assert_denied_400(&resp, "one 1 MiB header");
    server.assert_serves("a 1 MiB header").await;

    // max_headers (256): 256 headers are fine, 257 are not.
    for (extra, allowed) in [(0, true), (1, false), (5000, false)] {
        let mut req = valid_request();
        let (count, _) = header_budget(&req);
        for i in 0..(256 - count + extra) {
            set_header(&mut req, &format!("x-h-{i}"), "v");
        }
        let headers = header_budget(&req).0;
        let resp = try_check(&mut client, req).await.expect("a successful RPC");
        if allowed {
            assert_eq!(
                outcome(&resp).0,
                0,
                "{headers} headers: {:?}",
                outcome(&resp)
            );
        } else {
            assert_denied_400(&resp, &format!("{headers} headers"));
        }
    }
    server.assert_serves("too many headers").await;

    // max_header_bytes (96 KiB of names and values): exactly at the limit is fine, one more
    // byte is not, in `headers` and in `header_map` alike.
    for (over, allowed) in [(0, true), (1, false), (500_000, false)] {
        let mut req = valid_request();
        let (_, bytes) = header_budget(&req);
        let value_len = 96 * 1024 - bytes - "x-pad".len() + over;
        set_header(&mut req, "x-pad", "p".repeat(value_len));
        let resp = try_check(&mut client, req).await.expect("a successful RPC");
        if allowed {
            assert_eq!(outcome(&resp).0, 0, "header bytes at the limit");
        } else {
            assert_denied_400(&resp, &format!("header bytes {over} over the limit"));
        }
    }
    let mut req = valid_request();
    http_mut(&mut req).header_map = Some(HeaderMap {
        headers: vec![
            HeaderValue {
                key: "x-raw".into(),
                value: String::new(),
                raw_value: vec![b'r'; 200 * 1024],
            };
            1
        ],
    });
    assert_denied_400(
        &try_check(&mut client, req).await.expect("RPC"),
        "a 200 KiB raw header value",
    );
    let mut req = valid_request();
    http_mut(&mut req).header_map = Some(HeaderMap {
        headers: (0..300)
            .map(|i| HeaderValue {
                key: format!("x-{i}"),
                value: "v".into(),
                raw_value: Vec::new(),
            })
            .collect(),
    });
    assert_denied_400(
        &try_check(&mut client, req).await.expect("RPC"),
        "300 headers in header_map",
    );
    server.assert_serves("too large headers").await;

    assert_eq!(
        server.audit_count("unreadable_request", 7).await,
        7,
        "audit lines with reason unreadable_request"
    );
    assert_eq!(
        server.audit_count("request_too_large", 4).await,
        4,
        "audit lines with reason request_too_large"
    );
}

// ---------------------------------------------------------------------------------------
// Deeply nested input.
// ---------------------------------------------------------------------------------------

fn nested_struct(depth: usize) -> prost_types::Struct {
    use prost_types::value::Kind;
    let mut s = prost_types::Struct {
        fields: [(
            "leaf".to_string(),
            prost_types::Value {
                kind: Some(Kind::StringValue("x".into())),
            },
        )]
        .into_iter()
        .collect(),
    };
    for _ in 1..depth {
        s = prost_types::Struct {
            fields: [(
                "n".to_string(),
                prost_types::Value {
                    kind: Some(Kind::StructValue(s)),
                },
            )]
            .into_iter()
            .collect(),
        };
    }
    s
}

fn with_metadata(depth: usize, route: bool) -> CheckRequest {
    let mut req = valid_request();
    let metadata = Metadata {
        filter_metadata: [("envoy.filters.http.x".to_string(), nested_struct(depth))]
            .into_iter()
            .collect(),
        ..Default::default()
    };
    if route {
        attrs_mut(&mut req).route_metadata_context = Some(metadata);
    } else {
        attrs_mut(&mut req).metadata_context = Some(metadata);
    }
    req
}

fn varint(mut v: u64, out: &mut Vec<u8>) {
    while v >= 0x80 {
        out.push(v as u8 | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
}

/// A length-delimited protobuf field.
fn pb_field(tag: u64, payload: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(payload.len() + 8);
    varint(tag << 3 | 2, &mut out);
    varint(payload.len() as u64, &mut out);
    out.extend_from_slice(payload);
    out
}

/// A gRPC frame holding a valid CheckRequest whose `metadata_context` (or
/// `route_metadata_context`) carries a `google.protobuf.Struct` nested `depth` deep,
/// encoded iteratively. Protobuf merges the second `attributes` field into the first.
fn deep_metadata_request(depth: usize, route: bool) -> Vec<u8> {
    let mut s = Vec::new();
    for _ in 0..depth {
        let value = pb_field(5, &s); // Value.struct_value
        let mut entry = pb_field(1, b"n"); // map entry key
        entry.extend(pb_field(2, &value)); // map entry value
        s = pb_field(1, &entry); // Struct.fields
    }
    let mut entry = pb_field(1, b"envoy.filters.http.x");
    entry.extend(pb_field(2, &s));
    let metadata = pb_field(1, &entry); // Metadata.filter_metadata
    let attrs = pb_field(if route { 13 } else { 11 }, &metadata);
    let mut message = valid_request().encode_to_vec();
    message.extend(pb_field(1, &attrs)); // CheckRequest.attributes
    grpc_frame(0, message.len() as u32, &message)
}

/// `[[[...]]]` or `{"a":{"a":...}}`, `depth` levels.
fn nested_json(depth: usize, arrays: bool) -> String {
    if arrays {
        format!("{}1{}", "[".repeat(depth), "]".repeat(depth))
    } else {
        format!("{}1{}", "{\"a\":".repeat(depth), "}".repeat(depth))
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deeply_nested_inputs_are_refused_or_ignored_never_a_crash() {
    let m = material();
    let server = server("");
    let mut client = server.client().await;

    // Metadata Envoy may forward: harmless when shallow; too deep for prost's recursion
    // limit (100) it cannot be decoded, so the RPC fails. No stack overflow either way.
    // Encoded by hand, without recursion, and sent on raw HTTP/2 (a 5000-deep Struct would
    // overflow the test's own stack in prost).
    for route in [false, true] {
        let reply = raw_check(server.grpc, &[], deep_metadata_request(10, route)).await;
        assert_eq!(reply.grpc_status, Some(0), "shallow metadata: {reply:?}");
        assert_eq!(
            reply.message.as_ref().map(|m| outcome(m).0),
            Some(0),
            "shallow metadata changes nothing"
        );
        for depth in [30, 45, 60, 99] {
            let reply = raw_check(server.grpc, &[], deep_metadata_request(depth, route)).await;
            if reply.rpc_error() {
                println!("metadata depth {depth} (route {route}): RPC error {reply:?}");
            } else {
                assert_eq!(
                    reply.message.as_ref().map(|m| outcome(m).0),
                    Some(0),
                    "depth {depth}"
                );
            }
        }
        for depth in [200, 1000, 5000] {
            let reply = raw_check(server.grpc, &[], deep_metadata_request(depth, route)).await;
            assert!(
                reply.rpc_error(),
                "metadata nested {depth} deep was decoded: {reply:?}"
            );
            println!(
                "metadata depth {depth} (route {route}): grpc-status {:?}",
                reply.grpc_status
            );
        }
        server.assert_serves("deeply nested metadata").await;
    }

    // Deeply nested claims in a validly signed token (within the 8 KiB token cap): read
    // and ignored by this policy (allow), or refused as unreadable (401); never a crash.
    for (depth, arrays) in [
        (100, true),
        (127, true),
        (1000, true),
        (127, false),
        (900, false),
    ] {
        let mut claims = common::claims();
        claims["nested"] = serde_json::from_str(&nested_json(depth.min(120), arrays))
            .expect("shallow enough for serde");
        let token = if depth <= 120 {
            m.signer.sign(&claims)
        } else {
            // serde_json cannot build deeper values; splice the raw JSON into the payload.
            let payload = claims
                .to_string()
                .replace(&nested_json(120, arrays), &nested_json(depth, arrays));
            let header = b64(br#"{"alg":"ES256","kid":"es","typ":"JWT"}"#);
            let signing_input = format!("{header}.{}", b64(payload.as_bytes()));
            let sig = sign_es256(&m.signer, &signing_input);
            format!("{signing_input}.{sig}")
        };
        assert!(token.len() < 8192, "{} bytes", token.len());
        let resp = try_check(&mut client, request("GET", VALID_PATH, None, Some(&token)))
            .await
            .expect("a successful RPC");
        let o = outcome(&resp);
        println!("claims nested {depth} deep (arrays {arrays}): {o:?}");
        match o.0 {
            0 => assert_eq!(ok_header(&resp, PRINCIPAL_HEADER).as_deref(), Some(ALICE)),
            _ => assert_eq!((o.0, o.1), (16, 401), "depth {depth}"),
        }
        server.assert_serves("deeply nested claims").await;
    }

    // The JSON door: nesting past serde's recursion limit is a 400, never a stack overflow.
    let http = reqwest::Client::new();
    let url = format!("http://{}/v1/check", server.http_addr());
    let deep_metadata = format!(
        r#"{{"attributes":{{"metadataContext":{{"filterMetadata":{{"x":{}}}}}}}}}"#,
        nested_json(20_000, false)
    );
    let deep_headers = format!(
        r#"{{"attributes":{{"request":{{"http":{{"method":"GET","path":"/api/x","headers":{}}}}}}}}}"#,
        nested_json(50_000, false)
    );
    for (what, body, status) in [
        ("500k nested arrays", nested_json(500_000, true), 400),
        ("150k nested objects", nested_json(150_000, false), 400),
        ("metadata nested 20k deep", deep_metadata, 400),
        ("headers nested 50k deep", deep_headers, 400),
        ("2 MiB body", "[".repeat(2 * MIB), 413),
    ] {
        let resp = http
            .post(&url)
            .body(body)
            .timeout(Duration::from_secs(15))
            .send()
            .await
            .unwrap_or_else(|e| panic!("{what}: the JSON door did not answer: {e}"));
        assert_eq!(resp.status().as_u16(), status, "{what}");
        server.assert_serves(what).await;
    }
    // The 413 is sent before the body is read. A client that goes on sending all of it is
    // not reset (the listener drains before it closes), and then reads its 413: a reset
    // would fail its writes, and a client that stops at a failed write (as hyper's does)
    // would lose the reply.
    let mut raw = TcpStream::connect(server.http_addr())
        .await
        .expect("connect");
    let head = format!(
        "POST /v1/check HTTP/1.1\r\nhost: x\r\ncontent-length: {}\r\n\r\n",
        4 * MIB
    );
    raw.write_all(head.as_bytes()).await.expect("head");
    let chunk = vec![b'['; 64 * 1024];
    for _ in 0..64 {
        raw.write_all(&chunk)
            .await
            .expect("the listener reset a client still sending its body");
    }
    let mut reply = Vec::new();
    tokio::time::timeout(Duration::from_secs(15), raw.read_to_end(&mut reply))
        .await
        .expect("the listener closed")
        .expect("the reply, not a reset");
    let reply = String::from_utf8_lossy(&reply);
    assert!(reply.starts_with("HTTP/1.1 413"), "{reply}");
    // And a sane JSON request still gets its decision.
    let sane = portcullis::proto::to_json(
        "envoy.service.auth.v3.CheckRequest",
        &with_metadata(5, false),
    )
    .expect("to JSON");
    let resp = http
        .post(&url)
        .body(sane.to_string())
        .send()
        .await
        .expect("JSON door");
    assert_eq!(resp.status().as_u16(), 200);
    let body: Value = serde_json::from_str(&resp.text().await.expect("body")).expect("JSON");
    assert!(
        body["status"]["code"].as_i64().unwrap_or(0) == 0,
        "a valid JSON request was denied: {body}"
    );
}

/// An ES256 JWS signature (raw r||s, base64url) over `input` with the signer's key.
fn sign_es256(signer: &TokenSigner, input: &str) -> String {
    let key = EncodingKey::from_ec_pem(signer.private_key_pem().as_bytes()).expect("EC key");
    jsonwebtoken::crypto::sign(input.as_bytes(), &key, Algorithm::ES256).expect("sign")
}

// ---------------------------------------------------------------------------------------
// Malformed protobuf and gRPC framing on raw HTTP/2.
// ---------------------------------------------------------------------------------------

/// What a raw gRPC call got back.
#[derive(Debug)]
struct RawReply {
    http_status: u16,
    grpc_status: Option<i32>,
    message: Option<CheckResponse>,
}

impl RawReply {
    fn rpc_error(&self) -> bool {
        self.http_status != 200 || self.grpc_status.is_some_and(|s| s != 0)
    }

    /// An RPC error, or a successful RPC whose CheckResponse denies.
    fn error_or_deny(&self) -> bool {
        self.rpc_error()
            || (self.grpc_status == Some(0)
                && self
                    .message
                    .as_ref()
                    .is_some_and(|m| outcome(m).0 != 0 && outcome(m).1 >= 400))
    }
}

/// Extra request headers of a raw gRPC call.
type Headers = Vec<(&'static str, &'static str)>;

/// One gRPC frame: compressed flag, 4-byte big-endian length, message.
fn grpc_frame(flag: u8, len: u32, message: &[u8]) -> Vec<u8> {
    let mut f = vec![flag];
    f.extend_from_slice(&len.to_be_bytes());
    f.extend_from_slice(message);
    f
}

async fn h2_sender(addr: SocketAddr) -> hyper::client::conn::http2::SendRequest<Full<Bytes>> {
    let stream = TcpStream::connect(addr).await.expect("connect");
    let (sender, conn) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(stream))
            .await
            .expect("HTTP/2 handshake");
    tokio::spawn(conn);
    sender
}

fn grpc_request<B>(
    addr: SocketAddr,
    path: &str,
    headers: &[(&'static str, &'static str)],
    body: B,
) -> hyper::Request<B> {
    let mut req = hyper::Request::builder()
        .method("POST")
        .uri(format!("http://{addr}{path}"))
        .header("content-type", "application/grpc")
        .header("te", "trailers")
        .body(body)
        .expect("request");
    for (k, v) in headers {
        req.headers_mut()
            .insert(*k, hyper::header::HeaderValue::from_static(v));
    }
    req
}

/// Sends `body` as the whole request body of one call on a new HTTP/2 connection.
async fn raw_call(
    addr: SocketAddr,
    path: &str,
    headers: &[(&'static str, &'static str)],
    body: Vec<u8>,
) -> RawReply {
    let mut sender = h2_sender(addr).await;
    let req = grpc_request(addr, path, headers, Full::new(Bytes::from(body)));
    let resp = tokio::time::timeout(Duration::from_secs(10), sender.send_request(req))
        .await
        .expect("the server answered in time")
        .expect("an HTTP/2 response");
    let http_status = resp.status().as_u16();
    let status_of =
        |h: &hyper::HeaderMap| -> Option<i32> { h.get("grpc-status")?.to_str().ok()?.parse().ok() };
    let header_status = status_of(resp.headers());
    let collected = tokio::time::timeout(Duration::from_secs(10), resp.into_body().collect())
        .await
        .expect("the body ended in time")
        .expect("a body");
    let trailer_status = collected.trailers().and_then(status_of);
    let data = collected.to_bytes();
    let message = (data.len() >= 5).then(|| {
        CheckResponse::decode(&data[5..]).expect("a CheckResponse after a gRPC frame header")
    });
    RawReply {
        http_status,
        grpc_status: header_status.or(trailer_status),
        message,
    }
}

async fn raw_check(
    addr: SocketAddr,
    headers: &[(&'static str, &'static str)],
    body: Vec<u8>,
) -> RawReply {
    raw_call(addr, CHECK_PATH, headers, body).await
}

/// A CheckRequest whose `attributes.request.http.method` holds bytes that are not UTF-8.
fn invalid_utf8_request() -> Vec<u8> {
    let method = [0x12, 2, 0xff, 0xfe]; // HttpRequest.method (2), length-delimited
    let mut http = vec![0x12, method.len() as u8]; // Request.http (2)
    http.extend_from_slice(&method);
    let mut req = vec![0x22, http.len() as u8]; // AttributeContext.request (4)
    req.extend_from_slice(&http);
    let mut attrs = vec![0x0a, req.len() as u8]; // CheckRequest.attributes (1)
    attrs.extend_from_slice(&req);
    attrs
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_protobuf_and_framing_get_rpc_errors_never_a_crash() {
    let server = server("");
    let addr = server.grpc;
    let valid = valid_request().encode_to_vec();
    let anonymous = request("GET", VALID_PATH, None, None).encode_to_vec();
    let mut rng = Rng::new(7);

    // Sanity: the raw client gets an allow for a valid request.
    let reply = raw_check(addr, &[], grpc_frame(0, valid.len() as u32, &valid)).await;
    assert_eq!(reply.grpc_status, Some(0), "{reply:?}");
    assert_eq!(reply.message.as_ref().map(|m| outcome(m).0), Some(0));

    // No CheckRequest can be read from these: each must be an RPC error.
    let truncated = grpc_frame(0, valid.len() as u32, &valid[..valid.len() / 2]);
    let cases: Vec<(&str, Headers, Vec<u8>)> = vec![
        ("empty body", vec![], vec![]),
        ("half a frame header", vec![], vec![0, 0, 0]),
        ("truncated message", vec![], truncated),
        (
            "length prefix 1000, 10 bytes",
            vec![],
            grpc_frame(0, 1000, &valid[..10]),
        ),
        (
            "length prefix u32::MAX",
            vec![],
            grpc_frame(0, u32::MAX, &valid[..10]),
        ),
        (
            "length prefix over max_message_bytes",
            vec![],
            grpc_frame(0, 2 * MIB as u32, &vec![0; 2 * MIB]),
        ),
        (
            "compressed flag without grpc-encoding",
            vec![],
            grpc_frame(1, valid.len() as u32, &valid),
        ),
        (
            "compressed flag with an unsupported grpc-encoding",
            vec![("grpc-encoding", "gzip")],
            grpc_frame(1, valid.len() as u32, &valid),
        ),
        (
            "compressed flag 0x80",
            vec![],
            grpc_frame(0x80, valid.len() as u32, &valid),
        ),
        (
            "string field that is not UTF-8",
            vec![],
            grpc_frame(
                0,
                invalid_utf8_request().len() as u32,
                &invalid_utf8_request(),
            ),
        ),
        (
            "a field with an invalid wire type",
            vec![],
            grpc_frame(0, 2, &[0x0f, 0x01]),
        ),
        (
            "a length-delimited field longer than the message",
            vec![],
            grpc_frame(0, 3, &[0x0a, 0x7f, 0x00]),
        ),
        (
            "a varint that never ends",
            vec![],
            grpc_frame(
                0,
                11,
                &[
                    0x08, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff,
                ],
            ),
        ),
    ];
    for (what, headers, body) in cases {
        let reply = raw_check(addr, &headers, body).await;
        assert!(
            reply.rpc_error(),
            "{what}: expected an RPC error, got {reply:?}"
        );
        server.assert_alive();
    }
    server.assert_serves("unreadable gRPC messages").await;

    // An unknown method and a wrong content type are refused too.
    let reply = raw_call(
        addr,
        "/envoy.service.auth.v3.Authorization/Nope",
        &[],
        grpc_frame(0, valid.len() as u32, &valid),
    )
    .await;
    assert_eq!(reply.grpc_status, Some(12), "unknown method: {reply:?}");
    // tonic does not check the content type: text/plain is answered like gRPC, with the
    // same decision (or refused); never anything else.
    let reply = raw_call(
        addr,
        CHECK_PATH,
        &[("content-type", "text/plain")],
        grpc_frame(0, valid.len() as u32, &valid),
    )
    .await;
    println!("content-type text/plain: {reply:?}");
    assert!(
        reply.rpc_error() || reply.message.as_ref().map(|m| outcome(m).0) == Some(0),
        "{reply:?}"
    );

    // Readable or not, these must never be allowed: random bytes, random messages in a
    // correct frame (protobuf decodes some of them as unknown fields: then a 400 deny),
    // an empty message, and an anonymous request sent twice in one call.
    let mut kinds = [0usize; 2];
    for i in 0..150 {
        let len = 1 + rng.below(400);
        let body = if i % 2 == 0 {
            rng.bytes(len)
        } else {
            grpc_frame(0, len as u32, &rng.bytes(len))
        };
        let reply = raw_check(addr, &[], body).await;
        assert!(reply.error_or_deny(), "random input #{i}: {reply:?}");
        kinds[usize::from(!reply.rpc_error())] += 1;
    }
    println!(
        "random gRPC bodies: {} RPC errors, {} denies",
        kinds[0], kinds[1]
    );
    let reply = raw_check(addr, &[], grpc_frame(0, 0, &[])).await;
    assert_eq!(reply.grpc_status, Some(0), "{reply:?}");
    assert_eq!(
        reply.message.as_ref().map(outcome),
        Some((3, 400, None)),
        "an empty CheckRequest is unreadable"
    );
    let mut twice = grpc_frame(0, anonymous.len() as u32, &anonymous);
    twice.extend(grpc_frame(0, anonymous.len() as u32, &anonymous));
    let reply = raw_check(addr, &[], twice).await;
    assert!(reply.error_or_deny(), "two messages in one call: {reply:?}");
    let mut valid_then_garbage = grpc_frame(0, anonymous.len() as u32, &anonymous);
    valid_then_garbage.extend(grpc_frame(0, 100, &[0xff; 10]));
    let reply = raw_check(addr, &[], valid_then_garbage).await;
    assert!(reply.error_or_deny(), "a message then garbage: {reply:?}");

    server.assert_serves("malformed protobuf").await;
}

// ---------------------------------------------------------------------------------------
// Slow, stalled and abandoned connections.
// ---------------------------------------------------------------------------------------

const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

fn h2_frame(kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
    let len = payload.len();
    let mut f = vec![(len >> 16) as u8, (len >> 8) as u8, len as u8, kind, flags];
    f.extend_from_slice(&(stream & 0x7fff_ffff).to_be_bytes());
    f.extend_from_slice(payload);
    f
}

/// An HPACK header block for a gRPC Check call, literals only (no dynamic table).
fn hpack_check_headers() -> Vec<u8> {
    // :method POST (static 3), :scheme http (static 6).
    let mut h = vec![0x83, 0x86];
    let mut literal = |prefix: &[u8], value: &str| {
        h.extend_from_slice(prefix);
        h.push(value.len() as u8);
        h.extend_from_slice(value.as_bytes());
    };
    // Literal without indexing, indexed name: :path (4), :authority (1), content-type (31).
    literal(&[0x04], CHECK_PATH);
    literal(&[0x01], "127.0.0.1");
    literal(&[0x0f, 0x10], "application/grpc");
    // New name: te.
    literal(&[0x00, 2, b't', b'e'], "trailers");
    h
}

async fn read_h2_frame(s: &mut TcpStream) -> std::io::Result<(u8, u8, u32, Vec<u8>)> {
    let mut head = [0u8; 9];
    s.read_exact(&mut head).await?;
    let len = (usize::from(head[0]) << 16) | (usize::from(head[1]) << 8) | usize::from(head[2]);
    let stream = u32::from_be_bytes([head[5], head[6], head[7], head[8]]) & 0x7fff_ffff;
    let mut payload = vec![0; len];
    s.read_exact(&mut payload).await?;
    Ok((head[3], head[4], stream, payload))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_stalled_and_abandoned_connections_do_not_block_other_clients() {
    let server = server("");
    let addr = server.grpc;
    let valid = valid_request().encode_to_vec();

    // 200 raw TCP connections that stall at different points of the HTTP/2 handshake.
    let mut held = Vec::new();
    for i in 0..200 {
        let mut s = TcpStream::connect(addr).await.expect("connect");
        match i % 5 {
            0 => {}                                          // nothing at all
            1 => s.write_all(&PREFACE[..12]).await.unwrap(), // half the preface
            2 => s.write_all(PREFACE).await.unwrap(),        // the preface, no SETTINGS
            3 => {
                // The preface, then a SETTINGS frame cut off mid-header.
                s.write_all(PREFACE).await.unwrap();
                s.write_all(&h2_frame(4, 0, 0, &[])[..4]).await.unwrap();
            }
            _ => {
                // A complete handshake, then a HEADERS frame that announces more than it sends.
                s.write_all(PREFACE).await.unwrap();
                s.write_all(&h2_frame(4, 0, 0, &[])).await.unwrap();
                let headers = h2_frame(1, 0x4, 1, &hpack_check_headers());
                let mut announced = headers.clone();
                announced[2] = announced[2].wrapping_add(40);
                s.write_all(&announced[..headers.len()]).await.unwrap();
            }
        }
        held.push(s);
    }
    // 20 HTTP/2 connections, each with 5 calls whose body stops in the middle of a gRPC
    // frame and never ends.
    let mut stalled_bodies = Vec::new();
    let mut stalled_calls = Vec::new();
    let mut stalled_conns = Vec::new();
    for _ in 0..20 {
        let stream = TcpStream::connect(addr).await.expect("connect");
        let (mut sender, conn) =
            hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(stream))
                .await
                .expect("handshake");
        stalled_conns.push(tokio::spawn(conn));
        for _ in 0..5 {
            let (tx, rx) =
                tokio::sync::mpsc::channel::<Result<Frame<Bytes>, std::convert::Infallible>>(1);
            let partial = grpc_frame(0, valid.len() as u32, &valid[..valid.len() / 3]);
            tx.send(Ok(Frame::data(Bytes::from(partial))))
                .await
                .unwrap();
            stalled_bodies.push(tx);
            let body = StreamBody::new(tokio_stream::wrappers::ReceiverStream::new(rx));
            let call = sender.send_request(grpc_request(addr, CHECK_PATH, &[], body));
            stalled_calls.push(tokio::spawn(async move {
                let _ = call.await;
            }));
        }
    }
    tokio::time::sleep(Duration::from_millis(200)).await;

    // Meanwhile, fresh clients are answered correctly and in time.
    let mut slowest = Duration::ZERO;
    for i in 0..40 {
        let started = Instant::now();
        server
            .assert_serves(&format!("stalled connections (#{i})"))
            .await;
        slowest = slowest.max(started.elapsed());
    }
    // And one client on one connection keeps going too.
    let mut client = server.client().await;
    for _ in 0..100 {
        let started = Instant::now();
        let resp = try_check(&mut client, valid_request()).await.expect("RPC");
        assert_eq!(outcome(&resp).0, 0);
        slowest = slowest.max(started.elapsed());
    }
    println!(
        "{} stalled connections, {} stalled calls: slowest valid request {slowest:?}",
        held.len(),
        stalled_bodies.len()
    );
    assert!(slowest < ANSWER_BOUND, "{slowest:?}");

    // Abandoned: calls sent and then dropped with their connection before the answer, and
    // calls cancelled by their client's deadline.
    for _ in 0..50 {
        let stream = TcpStream::connect(addr).await.expect("connect");
        let (mut sender, conn) =
            hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(stream))
                .await
                .expect("handshake");
        let conn = tokio::spawn(conn);
        let call = sender.send_request(grpc_request(
            addr,
            CHECK_PATH,
            &[],
            Full::new(Bytes::from(grpc_frame(0, valid.len() as u32, &valid))),
        ));
        tokio::time::sleep(Duration::from_millis(1)).await;
        drop(call);
        conn.abort();
    }
    let mut client = server.client().await;
    for _ in 0..50 {
        let mut r = tonic::Request::new(valid_request());
        r.set_timeout(Duration::from_micros(200));
        let _ = client.check(r).await;
    }
    // Connections closed by the peer half-way through.
    for (s, i) in held.iter_mut().zip(0..) {
        if i % 2 == 0 {
            let _ = s.shutdown().await;
        }
    }
    drop(stalled_bodies);
    for c in &stalled_calls {
        c.abort();
    }
    for c in &stalled_conns {
        c.abort();
    }
    server.assert_serves("abandoned calls").await;
    drop(held);
    tokio::time::sleep(Duration::from_millis(100)).await;
    server.assert_serves("closed connections").await;
}

// ---------------------------------------------------------------------------------------
// Many concurrent streams; max_streams_per_connection, max_concurrent, request_timeout.
// ---------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_thousand_concurrent_calls_on_one_connection_are_all_answered_correctly() {
    let server = server("");
    let client = AuthorizationClient::new(connect(server.grpc).await);
    let started = Instant::now();
    let mut calls = Vec::new();
    for i in 0..2000 {
        let mut client = client.clone();
        calls.push(tokio::spawn(async move {
            let valid = i % 2 == 0;
            let req = if valid {
                valid_request()
            } else {
                request("GET", VALID_PATH, None, None)
            };
            (valid, try_check(&mut client, req).await)
        }));
    }
    let (mut allowed, mut denied) = (0, 0);
    for call in calls {
        let (valid, result) = call.await.expect("task");
        let resp = result.expect("every call is a successful RPC");
        if valid {
            assert_eq!(outcome(&resp).0, 0, "{:?}", outcome(&resp));
            assert_eq!(ok_header(&resp, PRINCIPAL_HEADER).as_deref(), Some(ALICE));
            allowed += 1;
        } else {
            assert_eq!(
                outcome(&resp),
                (16, 401, Some("Bearer realm=\"portcullis\"".into()))
            );
            denied += 1;
        }
    }
    let took = started.elapsed();
    println!(
        "2000 concurrent calls on one connection: {allowed} allowed, {denied} denied in {took:?}"
    );
    assert!(took < Duration::from_secs(40), "{took:?}");
    server.assert_serves("2000 concurrent calls").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn streams_beyond_max_streams_per_connection_are_refused() {
    let server = server("[limits]\nmax_streams_per_connection = 7\n");
    let mut s = TcpStream::connect(server.grpc).await.expect("connect");
    s.write_all(PREFACE).await.unwrap();
    s.write_all(&h2_frame(4, 0, 0, &[])).await.unwrap();
    // The server's SETTINGS announce the limit ...
    let advertised = loop {
        let (kind, flags, _, payload) =
            tokio::time::timeout(Duration::from_secs(5), read_h2_frame(&mut s))
                .await
                .expect("server SETTINGS in time")
                .expect("a frame");
        if kind == 4 && flags & 1 == 0 {
            break payload
                .chunks_exact(6)
                .find(|e| e[..2] == [0, 3])
                .map(|e| u32::from_be_bytes([e[2], e[3], e[4], e[5]]));
        }
    };
    assert_eq!(advertised, Some(7), "SETTINGS_MAX_CONCURRENT_STREAMS");
    s.write_all(&h2_frame(4, 1, 0, &[])).await.unwrap();
    // ... and a client that ignores it gets the eighth open stream refused.
    let block = hpack_check_headers();
    for id in (1..=15).step_by(2) {
        s.write_all(&h2_frame(1, 0x4, id, &block)).await.unwrap();
    }
    let mut refused = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(5);
    while refused.is_empty() && Instant::now() < deadline {
        match tokio::time::timeout(Duration::from_millis(500), read_h2_frame(&mut s)).await {
            Ok(Ok((3, _, stream, payload))) => {
                let code = u32::from_be_bytes([payload[0], payload[1], payload[2], payload[3]]);
                refused.push((stream, code));
            }
            Ok(Ok((7, _, _, payload))) => panic!("GOAWAY: {payload:?}"),
            Ok(Ok(_)) | Err(_) => {}
            Ok(Err(e)) => panic!("connection failed: {e}"),
        }
    }
    assert_eq!(refused, [(15, 7)], "stream 15 refused (REFUSED_STREAM)");
    server
        .assert_serves("a client ignoring max_streams_per_connection")
        .await;
}

/// The slow issuer's `unknown_kid_wait`: how long an unknown-kid decision waits for the hung
/// key refresh, holding its place among `max_concurrent` meanwhile.
const KID_WAIT: Duration = Duration::from_millis(3000);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn beyond_max_concurrent_is_overloaded_and_a_slow_decision_hits_its_deadline() {
    // A second issuer whose key server answers once, then hangs: a token with an unknown
    // `kid` makes its decision wait KID_WAIT for a refresh (the fetch stays in flight for
    // fetch_timeout = 60 s). request_timeout must exceed every unknown_kid_wait; it is set
    // 1 ms over KID_WAIT, so a decision that spends more than that 1 ms before it starts
    // waiting (here: reading a 3 MB token) runs past request_timeout: `deadline`.
    let ks = KeyServer::start();
    let known = TokenSigner::generate(Algorithm::ES256, "slow-1");
    let unknown = TokenSigner::generate(Algorithm::ES256, "slow-unknown");
    ks.set_jwks(&portcullis::demo::jwks(&[&known]));
    let timeout = KID_WAIT + Duration::from_millis(1);
    let extra = format!(
        r#"
[limits]
max_concurrent = 4
request_timeout = "{}ms"
max_message_bytes = 16777216
max_header_bytes = 16777216

[token]
max_size = 16777216
{}"#,
        timeout.as_millis(),
        ks.slow_issuer(KID_WAIT),
    );
    let server = server_with(&extra, &[("idp-ca.pem", ks.ca_pem())]);
    let slow_claims = {
        let mut c = common::claims();
        c["iss"] = json!(SLOW_ISSUER);
        c
    };
    let known_token = known.sign(&slow_claims);
    let unknown_token = unknown.sign(&slow_claims);
    // The first fetch is done once the known key verifies; then the key server hangs.
    let probe = server.client().await;
    let fetched = common::eventually(Duration::from_secs(15), || {
        let mut probe = probe.clone();
        let req = request("GET", VALID_PATH, None, Some(&known_token));
        async move {
            try_check(&mut probe, req)
                .await
                .is_ok_and(|r| outcome(&r).0 == 0)
        }
    })
    .await;
    assert!(fetched, "the slow issuer's keys were never fetched");
    ks.set_mode(Mode::Slow(Duration::from_secs(600)));

    // 16 requests with the unknown kid at once: 4 are admitted and wait; the other 12 find
    // no place and are denied at once as overloaded.
    let client = server.client().await;
    let fired = Instant::now();
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    for _ in 0..16 {
        let (mut client, tx) = (client.clone(), tx.clone());
        let req = request("GET", VALID_PATH, None, Some(&unknown_token));
        tokio::spawn(async move {
            let started = Instant::now();
            let result = try_check(&mut client, req).await;
            let _ = tx.send((started.elapsed(), result));
        });
    }
    let mut answers = Vec::new();
    for _ in 0..12 {
        answers.push(rx.recv().await.expect("an answer"));
    }
    let first_twelve = fired.elapsed();
    assert!(
        first_twelve < KID_WAIT / 2,
        "the first 12 answers took {first_twelve:?}: not denied at once"
    );
    // While the 4 still hold their places, valid requests from another client are refused
    // as overloaded too, at once.
    let mut other = server.client().await;
    let mut probes = Vec::new();
    for _ in 0..5 {
        let started = Instant::now();
        let resp = try_check(&mut other, valid_request()).await.expect("RPC");
        probes.push((started.elapsed(), outcome(&resp)));
    }
    for _ in 0..4 {
        answers.push(rx.recv().await.expect("an answer"));
    }
    let invalid_token = Some("Bearer realm=\"portcullis\", error=\"invalid_token\"".to_string());
    let (mut overloaded, mut held_deadline, mut held_unknown) = (0, 0, 0);
    for (took, result) in &answers {
        let resp = result.as_ref().expect("every answer is a successful RPC");
        let o = outcome(resp);
        if o == (14, 503, None) {
            overloaded += 1;
            assert!(*took < KID_WAIT / 2, "an overloaded deny took {took:?}");
            continue;
        }
        // An admitted one waited KID_WAIT for the refresh: then the unknown kid is refused
        // (401), or, when reading the request took over 1 ms, its deadline came first.
        if o == (4, 503, None) {
            held_deadline += 1;
        } else {
            assert_eq!(o, (16, 401, invalid_token.clone()), "after {took:?}");
            held_unknown += 1;
        }
        assert!(
            *took >= KID_WAIT - Duration::from_millis(100) && *took < KID_WAIT * 3,
            "an admitted request answered after {took:?}"
        );
    }
    println!(
        "max_concurrent 4: {overloaded} overloaded at once, {} admitted ({held_unknown} unknown kid after the wait, {held_deadline} deadline); valid requests while full: {probes:?}",
        held_unknown + held_deadline
    );
    assert_eq!(
        (overloaded, held_unknown + held_deadline),
        (12, 4),
        "exactly max_concurrent admitted"
    );
    for (took, o) in &probes {
        assert_eq!(*o, (14, 503, None), "a valid request while full");
        assert!(*took < KID_WAIT / 2, "{took:?}");
    }
    server.assert_serves("a full house").await;

    // request_timeout: a 3 MB token with the unknown kid takes well over 1 ms to read before
    // its decision starts waiting, so the wait runs past request_timeout.
    let mut big = slow_claims.clone();
    big["pad"] = json!("p".repeat(3 * MIB));
    let big_token = unknown.sign(&big);
    let started = Instant::now();
    let resp = try_check(
        &mut other,
        request("GET", VALID_PATH, None, Some(&big_token)),
    )
    .await
    .expect("RPC");
    let took = started.elapsed();
    println!(
        "a 3 MB unknown-kid token: {:?} after {took:?}",
        outcome(&resp)
    );
    assert_eq!(outcome(&resp), (4, 503, None), "after {took:?}");
    assert!(
        took >= timeout - Duration::from_millis(100) && took < KID_WAIT * 3,
        "{took:?}"
    );

    server.assert_serves("a decision past its deadline").await;
    assert_eq!(
        server.audit_count("overloaded", 17).await,
        17,
        "audit: overloaded"
    );
    assert_eq!(
        server.audit_count("deadline", held_deadline + 1).await,
        held_deadline + 1,
        "audit: deadline"
    );
    drop(server);
}

// ---------------------------------------------------------------------------------------
// Garbage in every field, and memory.
// ---------------------------------------------------------------------------------------

/// xorshift64*, seeded: the same garbage on every run.
struct Rng(u64);

impl Rng {
    fn new(seed: u64) -> Rng {
        Rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1)
    }
    fn next(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        self.0 = x;
        x.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n.max(1) as u64) as usize
    }
    fn chance(&mut self, percent: usize) -> bool {
        self.below(100) < percent
    }
    fn pick<'a, T>(&mut self, items: &'a [T]) -> &'a T {
        &items[self.below(items.len())]
    }
    fn bytes(&mut self, n: usize) -> Vec<u8> {
        (0..n).map(|_| self.next() as u8).collect()
    }
}

const ODD: &[&str] = &[
    "\u{0}",
    "\u{7f}",
    "\r\n",
    "\t",
    "é",
    "\u{202e}",
    "\u{feff}",
    "\u{fffd}",
    "💥",
    "\u{10ffff}",
    "\"",
    "\\",
    "'",
    ";",
    "/",
    ".",
    "..",
    "*",
    "%",
    "%00",
    "%2F",
    "%zz",
    "=",
    ",",
    " ",
    "::",
    "${jndi:ldap://x}",
    "<script>",
    "\u{200b}",
    "Path::\"",
    "\\u0000",
];

/// A string of printable, control and odd characters; usually short, sometimes up to `max`.
fn garbage(rng: &mut Rng, max: usize) -> String {
    let len = match rng.below(10) {
        0..=5 => rng.below(24),
        6..=8 => rng.below(256),
        _ => rng.below(max),
    };
    let mut s = String::new();
    while s.len() < len {
        match rng.below(4) {
            0 | 1 => s.push(char::from(0x20 + rng.below(0x5f) as u8)),
            2 => s.push(char::from(rng.below(0x20) as u8)),
            _ => s.push_str(rng.pick::<&str>(ODD)),
        }
    }
    s
}

fn non_empty_garbage(rng: &mut Rng, max: usize) -> String {
    let s = garbage(rng, max);
    if s.is_empty() { "\u{0}".into() } else { s }
}

fn garbage_json(rng: &mut Rng, depth: usize) -> Value {
    match rng.below(if depth == 0 { 5 } else { 7 }) {
        0 => Value::Null,
        1 => json!(rng.chance(50)),
        2 => json!(rng.next() as i64),
        3 => json!(rng.next() as f64 / 7.0),
        4 => json!(garbage(rng, 64)),
        5 => Value::Array(
            (0..rng.below(4))
                .map(|_| garbage_json(rng, depth - 1))
                .collect(),
        ),
        _ => Value::Object(
            (0..rng.below(4))
                .map(|_| (garbage(rng, 16), garbage_json(rng, depth - 1)))
                .collect(),
        ),
    }
}

/// Header names a garbage header must not take: the ones that carry credentials or that a
/// test policy reads.
fn reserved_header(name: &str) -> bool {
    let n = name.to_ascii_lowercase();
    n.starts_with(':')
        || [
            "authorization",
            "proxy-authorization",
            "cookie",
            "x-forwarded-client-cert",
            "x-flag",
        ]
        .contains(&n.as_str())
}

fn garbage_header_name(rng: &mut Rng) -> String {
    loop {
        let name = garbage(rng, 64);
        if !reserved_header(&name) {
            return name;
        }
    }
}

/// An `Authorization` value with a bearer scheme whose token is not valid.
fn garbage_bearer(rng: &mut Rng, m: &Material) -> (String, String) {
    let scheme = *rng.pick(&["Bearer ", "bearer ", "BEARER   ", "bEaReR ", "Bearer\t"]);
    let token68 = |rng: &mut Rng, n: usize| -> String {
        const CHARS: &[u8] =
            b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-._~+/=";
        (0..n).map(|_| char::from(*rng.pick(CHARS))).collect()
    };
    match rng.below(8) {
        0..=2 => {
            let (what, t) = rng.pick(&m.bad_tokens);
            (what.to_string(), format!("{scheme}{t}"))
        }
        3 => {
            let n = 1 + rng.below(300);
            (
                "random token68".into(),
                format!("{scheme}{}", token68(rng, n)),
            )
        }
        4 => {
            let parts: Vec<String> = (0..3)
                .map(|_| {
                    let n = rng.below(64);
                    b64(&rng.bytes(n))
                })
                .collect();
            (
                "three random parts".into(),
                format!("{scheme}{}", parts.join(".")),
            )
        }
        5 => (
            "random characters".into(),
            format!("{scheme}{}", garbage(rng, 4096)),
        ),
        6 => {
            let tail = non_empty_garbage(rng, 32);
            (
                "valid token with something after it".into(),
                format!("{scheme}{} {tail}", m.alice),
            )
        }
        _ => (
            "scheme only".into(),
            rng.pick(&["Bearer", "Bearer ", "Bearer    ", "bearer\t"])
                .to_string(),
        ),
    }
}

/// A `source.certificate` that must be rejected.
fn garbage_cert(rng: &mut Rng, m: &Material) -> (&'static str, String) {
    let enc = portcullis::demo::envoy_url_encode;
    let pem = &m.reader.pem;
    match rng.below(10) {
        0 => ("random characters", non_empty_garbage(rng, 4096)),
        1 => {
            let cut = 10 + rng.below(pem.len() - 40);
            ("truncated PEM", enc(&pem[..cut]))
        }
        2 => {
            let n = 1 + rng.below(1500);
            let body = base64::engine::general_purpose::STANDARD.encode(rng.bytes(n));
            (
                "PEM of random bytes",
                enc(&format!(
                    "-----BEGIN CERTIFICATE-----\n{body}\n-----END CERTIFICATE-----\n"
                )),
            )
        }
        3 => (
            "percent garbage",
            rng.pick(&["%", "%Z", "%ZZ%%%0", "%0", "%C0%AF", "%00%00", "%FF%FE%FD"])
                .to_string(),
        ),
        4 => ("foreign CA", m.foreign.envoy_encoded()),
        5 => ("CA certificate as the client", enc(&m.root.cert_pem())),
        6 => {
            // Change one base64 character in the middle of the body.
            let mut chars: Vec<char> = pem.chars().collect();
            let mid = chars.len() / 2;
            chars[mid] = if chars[mid] == 'A' { 'B' } else { 'A' };
            (
                "one character changed",
                enc(&chars.into_iter().collect::<String>()),
            )
        }
        7 => ("over max_size", "A".repeat(40_000)),
        8 => ("expired", m.expired.envoy_encoded()),
        _ => (
            "certificate under another label",
            enc(&pem.replace("CERTIFICATE", "PUBLIC KEY")),
        ),
    }
}

const HOSTILE_PATHS: &[&str] = &[
    "/api//orders",
    "/api/./orders",
    "/api/../api/orders",
    "/api/%2e%2e/admin",
    "/api/%61dmin/x",
    "/api/orders%2F1",
    "/api\\orders",
    "/api/orders;x=1",
    "/api/orders/1#frag",
    "/api/ orders",
    "/api/\u{0}",
    "/API/orders/1",
    "api/orders/1",
    "*",
    "/api",
    "/api/admin/x",
    "/api/admin/../orders",
    "/internal//status",
    "/internal/%2e%2e/api",
    "//api/orders",
    "/api/%zz",
    "/api/%",
    "/api/orders\r\n",
    "%2Fapi%2Forders",
    "/internal",
    "/internal/../internal/status",
];

const HOSTILE_RESOURCES: &[&str] = &[
    "User::\"alice\"",
    "Report::\"q\"",
    "Path::\"/api/admin/x\"",
    "Path::\"/other\"",
    "Path::",
    "Path::\"/api/x",
    "::",
    "Action::\"GET\"",
    "Path::\"\u{0}\"",
    "Path :: \"/api/admin/y\"",
    "not an entity",
];

#[derive(Clone, Copy, Debug, PartialEq)]
enum Base {
    /// alice's token, GET /api/orders/1: allowed.
    User,
    /// alice's token and the reader's certificate: allowed.
    UserWithCert,
    /// The reader's certificate, GET /internal/status: allowed.
    Workload,
    /// Nothing: denied.
    Anonymous,
    /// A freshly signed valid token with a garbage subject and garbage extra claims: allowed.
    FreshUser,
}

#[derive(Debug, PartialEq)]
enum Expect {
    Allow(Option<&'static str>),
    Deny,
}

struct Case {
    req: CheckRequest,
    expect: Expect,
    what: Vec<String>,
}

/// Mutations, applied in this order (so `HeaderMap`, which replaces `headers`, comes first
/// and later header mutations go into whichever map the server reads).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Mutation {
    HeaderMap,
    Method,
    Path,
    Host,
    Misc,
    ExtraHeaders,
    Authorization,
    Certificate,
    RouteAction,
    RouteResource,
    RouteOther,
    Source,
    Destination,
    TooManyHeaders,
    HugeHeader,
    Oversize,
}

fn pick_mutation(rng: &mut Rng) -> Mutation {
    use Mutation::*;
    match rng.below(1000) {
        0..=79 => HeaderMap,
        80..=159 => Method,
        160..=249 => Path,
        250..=339 => Host,
        340..=429 => Misc,
        430..=529 => ExtraHeaders,
        530..=629 => Authorization,
        630..=709 => Certificate,
        710..=769 => RouteAction,
        770..=829 => RouteResource,
        830..=889 => RouteOther,
        890..=939 => Source,
        940..=969 => Destination,
        970..=982 => TooManyHeaders,
        983..=995 => HugeHeader,
        _ => Oversize,
    }
}

fn short(s: &str) -> String {
    let s: String = s.chars().take(60).collect();
    format!("{s:?}")
}

/// Puts a header into the map the server reads: `header_map` when it is set, else `headers`.
fn put_header(req: &mut CheckRequest, name: &str, value: String) {
    let http = http_mut(req);
    match &mut http.header_map {
        Some(map) if !map.headers.is_empty() => map.headers.push(HeaderValue {
            key: name.to_string(),
            value,
            raw_value: Vec::new(),
        }),
        _ => {
            http.headers.insert(name.to_string(), value);
        }
    }
}

/// One request with garbage in some fields, and what the server must answer.
fn garbage_case(rng: &mut Rng, m: &Material) -> Case {
    let reader = m.reader.envoy_encoded();
    let base = *rng.pick(&[
        Base::User,
        Base::UserWithCert,
        Base::Workload,
        Base::Anonymous,
        Base::FreshUser,
    ]);
    let mut what = vec![format!("{base:?}")];
    let (mut req, mut allow, principal) = match base {
        Base::User => (valid_request(), true, Some(ALICE)),
        Base::UserWithCert => (
            request("GET", VALID_PATH, Some(&reader), Some(&m.alice)),
            true,
            Some(ALICE),
        ),
        Base::Workload => (
            request("GET", WORKLOAD_PATH, Some(&reader), None),
            true,
            Some("Workload::\"spiffe://example.org/ns/test/sa/reader\""),
        ),
        Base::Anonymous => (request("GET", VALID_PATH, None, None), false, None),
        Base::FreshUser => {
            let mut claims = common::claims();
            claims["sub"] = json!(non_empty_garbage(rng, 64));
            for i in 0..rng.below(4) {
                claims[format!("x_{i}")] = garbage_json(rng, 4);
            }
            what.push(format!(
                "sub {}",
                short(claims["sub"].as_str().unwrap_or(""))
            ));
            let token = m.signer.sign(&claims);
            (request("GET", VALID_PATH, None, Some(&token)), true, None)
        }
    };
    let mut mutations: Vec<Mutation> = (0..1 + rng.below(4)).map(|_| pick_mutation(rng)).collect();
    mutations.sort();
    mutations.dedup();
    for mutation in mutations {
        use Mutation::*;
        let denies = match mutation {
            HeaderMap => {
                // Replaces `headers` (and with it the token) when non-empty.
                let mut invalid_utf8 = false;
                let headers = (0..1 + rng.below(5))
                    .map(|_| {
                        let raw = rng.chance(15);
                        invalid_utf8 |= raw;
                        HeaderValue {
                            key: garbage_header_name(rng),
                            value: garbage(rng, 256),
                            raw_value: if raw {
                                vec![0xff, 0xfe, b'x']
                            } else {
                                Vec::new()
                            },
                        }
                    })
                    .collect();
                http_mut(&mut req).header_map = Some(header_map_of(headers));
                what.push(format!("header_map (invalid UTF-8: {invalid_utf8})"));
                // `headers` still holds the pseudo-headers (and the token): two forms that
                // disagree fail the request.
                true
            }
            Method => {
                let method = loop {
                    let m = non_empty_garbage(rng, 64);
                    if !m.eq_ignore_ascii_case("GET") {
                        break m;
                    }
                };
                what.push(format!("method {}", short(&method)));
                http_mut(&mut req).method = method;
                true
            }
            Path => {
                let path = if rng.chance(60) {
                    rng.pick(HOSTILE_PATHS).to_string()
                } else if rng.chance(50) {
                    format!("/zz{}", garbage(rng, 2048))
                } else {
                    format!("x{}", garbage(rng, 2048))
                };
                what.push(format!("path {}", short(&path)));
                http_mut(&mut req).path = path;
                true
            }
            Host => {
                let host = garbage(rng, 8192);
                what.push(format!("host {}", short(&host)));
                http_mut(&mut req).host = host.clone();
                http_mut(&mut req).headers.insert(":authority".into(), host);
                false
            }
            Misc => {
                let http = http_mut(&mut req);
                http.scheme = garbage(rng, 64);
                http.protocol = garbage(rng, 64);
                http.id = garbage(rng, 256);
                http.fragment = garbage(rng, 256);
                http.query = garbage(rng, 1024);
                http.body = garbage(rng, 4096);
                let n = rng.below(512);
                http.raw_body = rng.bytes(n);
                http.size = rng.next() as i64;
                if rng.chance(50) {
                    http.path = format!("{}?{}", http.path, garbage(rng, 1024));
                }
                what.push("scheme, protocol, id, fragment, query, body".into());
                false
            }
            ExtraHeaders => {
                for _ in 0..1 + rng.below(8) {
                    let name = garbage_header_name(rng);
                    let value = garbage(rng, 2048);
                    http_mut(&mut req).headers.insert(name, value);
                }
                what.push("extra headers".into());
                false
            }
            Authorization => {
                let (kind, value) = garbage_bearer(rng, m);
                what.push(format!("authorization: {kind}"));
                put_header(&mut req, "authorization", value);
                true
            }
            Certificate => {
                let (kind, cert) = garbage_cert(rng, m);
                what.push(format!("certificate: {kind}"));
                attrs_mut(&mut req)
                    .source
                    .get_or_insert_with(Default::default)
                    .certificate = cert;
                true
            }
            RouteAction => {
                let action = loop {
                    let a = non_empty_garbage(rng, 128);
                    if a != "GET" {
                        break a;
                    }
                };
                what.push(format!("route action {}", short(&action)));
                attrs_mut(&mut req)
                    .context_extensions
                    .insert("action".into(), action);
                true
            }
            RouteResource => {
                let resource = if rng.chance(50) {
                    rng.pick(HOSTILE_RESOURCES).to_string()
                } else {
                    format!("Zz{}", garbage(rng, 128))
                };
                what.push(format!("route resource {}", short(&resource)));
                attrs_mut(&mut req)
                    .context_extensions
                    .insert("resource".into(), resource);
                true
            }
            RouteOther => {
                for _ in 0..1 + rng.below(4) {
                    let key = loop {
                        let k = garbage(rng, 64);
                        if k != "action" && k != "resource" {
                            break k;
                        }
                    };
                    let value = garbage(rng, 1024);
                    attrs_mut(&mut req).context_extensions.insert(key, value);
                }
                what.push("other context_extensions".into());
                false
            }
            Source => {
                let source = attrs_mut(&mut req)
                    .source
                    .get_or_insert_with(Default::default);
                source.address = Some(Address {
                    address: Some(address::Address::SocketAddress(SocketAddress {
                        address: garbage(rng, 256),
                        port_specifier: Some(socket_address::PortSpecifier::PortValue(
                            rng.next() as u32
                        )),
                        ..Default::default()
                    })),
                });
                // Envoy's own view of the peer is never trusted.
                source.principal = if rng.chance(50) {
                    READER.to_string()
                } else {
                    garbage(rng, 256)
                };
                source.service = garbage(rng, 64);
                source.labels.insert(garbage(rng, 32), garbage(rng, 64));
                what.push("source address, principal, labels".into());
                false
            }
            Destination => {
                let attrs = attrs_mut(&mut req);
                attrs.destination = Some(attribute_context::Peer {
                    certificate: m.foreign.envoy_encoded(),
                    principal: READER.into(),
                    ..Default::default()
                });
                attrs.tls_session = Some(attribute_context::TlsSession {
                    sni: garbage(rng, 256),
                });
                attrs.metadata_context = Some(Metadata {
                    filter_metadata: [(garbage(rng, 32), nested_struct(1 + rng.below(6)))]
                        .into_iter()
                        .collect(),
                    ..Default::default()
                });
                what.push("destination, tls_session, metadata".into());
                false
            }
            TooManyHeaders => {
                for i in 0..300 {
                    put_header(&mut req, &format!("x-many-{i}"), "v".into());
                }
                what.push("300 headers".into());
                true
            }
            HugeHeader => {
                put_header(&mut req, "x-huge", "h".repeat(100 * 1024));
                what.push("a 100 KiB header".into());
                true
            }
            Oversize => {
                put_header(&mut req, "x-oversize", "o".repeat(MIB + 1024));
                what.push("over max_message_bytes".into());
                // Under the transport's hard cap (4x): a deny reply, no longer an RPC error.
                true
            }
        };
        allow &= !denies;
    }
    let expect = if allow {
        Expect::Allow(principal)
    } else {
        Expect::Deny
    };
    Case { req, expect, what }
}

fn header_map_of(headers: Vec<HeaderValue>) -> HeaderMap {
    HeaderMap { headers }
}

/// Checks one answer against the oracle; `Err` describes a wrong answer.
fn judge(case: &Case, result: &Result<CheckResponse, tonic::Status>) -> Result<bool, String> {
    let describe = || case.what.join("; ");
    match (&case.expect, result) {
        (_, Err(e)) => Err(format!(
            "RPC error {e:?} for a readable request: {}",
            describe()
        )),
        (Expect::Allow(principal), Ok(resp)) => {
            let o = outcome(resp);
            if o.0 != 0 || o.1 != 0 {
                return Err(format!("expected allow, got {o:?}: {}", describe()));
            }
            let got = ok_header(resp, PRINCIPAL_HEADER);
            match principal {
                Some(p) if got.as_deref() != Some(*p) => {
                    Err(format!("allowed as {got:?}, expected {p}: {}", describe()))
                }
                None if !got.as_deref().is_some_and(|g| g.starts_with("User::")) => Err(format!(
                    "allowed as {got:?}, expected a User: {}",
                    describe()
                )),
                _ => Ok(true),
            }
        }
        (Expect::Deny, Ok(resp)) => {
            let o = outcome(resp);
            if o.0 == 0 || o.1 < 400 {
                Err(format!("WRONG ALLOW {o:?}: {}", describe()))
            } else {
                Ok(false)
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn garbage_in_every_field_is_denied_unless_valid_and_memory_stays_bounded() {
    const WORKERS: u64 = 6;
    const WARM_UP: usize = 50;
    const PER_WORKER: usize = 600;
    const SEED: u64 = 0x5eed_0007;
    let server = Arc::new(server(""));

    async fn run(server: &Binary, seed: u64, n: usize) -> (usize, usize, usize, Vec<String>) {
        let m = material();
        let mut rng = Rng::new(seed);
        let mut client = server.client().await;
        let (mut allowed, mut denied, mut errors, mut wrong) = (0, 0, 0, Vec::new());
        for i in 0..n {
            let case = garbage_case(&mut rng, m);
            let result = try_check(&mut client, case.req.clone()).await;
            match judge(&case, &result) {
                Ok(true) => allowed += 1,
                Ok(false) if result.is_err() => errors += 1,
                Ok(false) => denied += 1,
                Err(e) => wrong.push(format!("seed {seed:#x} case #{i}: {e}")),
            }
        }
        (allowed, denied, errors, wrong)
    }

    // Warm-up: every code path once, caches and allocator settled.
    let mut warm = Vec::new();
    for w in 0..WORKERS {
        let server = server.clone();
        warm.push(tokio::spawn(async move {
            run(&server, SEED ^ (w << 32) ^ 0xffff, WARM_UP).await
        }));
    }
    for w in warm {
        let (_, _, _, wrong) = w.await.expect("worker");
        assert!(wrong.is_empty(), "{wrong:#?}");
    }
    let rss_before = server.rss_kib();
    let started = Instant::now();
    let mut workers = Vec::new();
    for w in 0..WORKERS {
        let server = server.clone();
        workers.push(tokio::spawn(async move {
            run(&server, SEED ^ w, PER_WORKER).await
        }));
    }
    let (mut allowed, mut denied, mut errors, mut wrong) = (0, 0, 0, Vec::new());
    for w in workers {
        let (a, d, e, bad) = w.await.expect("worker");
        allowed += a;
        denied += d;
        errors += e;
        wrong.extend(bad);
    }
    let took = started.elapsed();
    let rss_after = server.rss_kib();
    println!(
        "garbage: {} requests in {took:?}: {allowed} allowed (valid credential, permitted path), {denied} denied, {errors} RPC errors (oversize); RSS {rss_before} KiB -> {rss_after} KiB ({:+} KiB)",
        allowed + denied + errors,
        rss_after as i64 - rss_before as i64
    );
    assert!(
        wrong.is_empty(),
        "{} wrong answers:\n{:#?}",
        wrong.len(),
        &wrong[..wrong.len().min(30)]
    );
    assert!(
        // No RPC errors: every readable request under the hard cap gets a reply.
        allowed > 100 && denied > 1000 && errors == 0,
        "the mix is off"
    );
    server.assert_serves("garbage in every field").await;
    let growth_mib = rss_after.saturating_sub(rss_before) / 1024;
    assert!(growth_mib < 64, "RSS grew by {growth_mib} MiB");
}

// Found by the garbage test ("Bearer\t" among its schemes): `bearer_scheme` once split on ' '
// only, so "Bearer\t<jwt>" was taken for an unknown scheme and ignored, and the request was
// decided on the client certificate alone. A presented credential that cannot be verified
// must fail the request; and an upstream splitting on any whitespace would read a token
// Portcullis never checked.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bearer_credential_after_other_whitespace_is_not_ignored() {
    let m = material();
    let server = server("");
    let mut client = server.client().await;
    let reader = m.reader.envoy_encoded();
    let mut wrong = Vec::new();
    for sep in [" ", "\t", "\u{b}", "\u{a0}", " \t"] {
        for (what, token) in [
            ("garbage", "garbage"),
            ("a.b.c", "a.b.c"),
            ("alice's valid token", m.alice.as_str()),
        ] {
            let mut req = request("GET", WORKLOAD_PATH, Some(&reader), None);
            set_header(&mut req, "authorization", format!("Bearer{sep}{token}"));
            let resp = try_check(&mut client, req).await.expect("RPC");
            // With a space: garbage is refused (401); alice's token makes alice the
            // principal, whom no policy lets read /internal (403). Never the workload's allow.
            if outcome(&resp).0 == 0 {
                wrong.push(format!(
                    "\"Bearer{}<{what}>\" was ignored: allowed as {:?}",
                    sep.escape_debug(),
                    ok_header(&resp, PRINCIPAL_HEADER)
                ));
            }
        }
    }
    assert!(wrong.is_empty(), "{wrong:#?}");
}

// ---------------------------------------------------------------------------------------
// Work per request and the request deadline (issue 12, finding 8).
// ---------------------------------------------------------------------------------------

/// The CA parameters a certificate named `name` is issued under (same encoding as the
/// demo authorities', so names compare equal byte for byte).
fn junk_params(name: &str) -> rcgen::CertificateParams {
    let mut params = rcgen::CertificateParams::default();
    params
        .distinguished_name
        .push(rcgen::DnType::CommonName, name);
    params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    params.key_usages = vec![
        rcgen::KeyUsagePurpose::KeyCertSign,
        rcgen::KeyUsagePurpose::CrlSign,
    ];
    let now = time::OffsetDateTime::now_utc();
    params.not_before = now - time::Duration::days(1);
    params.not_after = now + time::Duration::days(30);
    params
}

fn junk_key() -> rcgen::KeyPair {
    rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).expect("P-256 key")
}

/// A CA certificate with subject `subject`, "issued" by `issuer` with a key of its own that
/// nobody trusts: with `subject == issuer`, every such certificate issues every other by
/// name, and path building searches every ordering of them.
fn junk_ca(subject: &str, issuer: &str) -> String {
    let issuer = rcgen::Issuer::new(junk_params(issuer), junk_key());
    junk_params(subject)
        .signed_by(&junk_key(), &issuer)
        .expect("sign a junk CA")
        .pem()
}

/// A client certificate for the reader's SPIFFE ID whose issuer is named `issuer`, signed
/// by a key nobody trusts.
fn junk_leaf(issuer: &str) -> String {
    let issuer = rcgen::Issuer::new(junk_params(issuer), junk_key());
    let mut params = rcgen::CertificateParams::default();
    params
        .distinguished_name
        .push(rcgen::DnType::CommonName, "reader");
    params.subject_alt_names = vec![rcgen::SanType::URI(READER.try_into().expect("ASCII URI"))];
    params.is_ca = rcgen::IsCa::ExplicitNoCa;
    params.key_usages = vec![rcgen::KeyUsagePurpose::DigitalSignature];
    params.extended_key_usages = vec![rcgen::ExtendedKeyUsagePurpose::ClientAuth];
    params
        .signed_by(&junk_key(), &issuer)
        .expect("sign a junk leaf")
        .pem()
}

/// PEM blocks as Envoy (and Traefik's PEM form) put a chain in `source.certificate`.
fn pem_chain(certs: &[&str]) -> String {
    portcullis::demo::envoy_url_encode(&certs.concat())
}

/// The chain as Traefik's passTLSClientCert sends it: base64 DER joined by ','.
fn traefik_chain(certs: &[&str]) -> String {
    certs
        .iter()
        .map(|pem| {
            use rustls_pki_types::pem::PemObject as _;
            let der = rustls_pki_types::CertificateDer::from_pem_slice(pem.as_bytes())
                .expect("one PEM certificate");
            base64::engine::general_purpose::STANDARD.encode(der.as_ref())
        })
        .collect::<Vec<_>>()
        .join(",")
}

/// An `x-forwarded-client-cert` element carrying `leaf` and the chain `leaf` + `rest`.
fn xfcc_chain(leaf: &str, rest: &[&str]) -> String {
    let mut chain = vec![leaf];
    chain.extend_from_slice(rest);
    format!(
        "By=spiffe://example.org/edge;Cert=\"{}\";Chain=\"{}\"",
        pem_chain(&[leaf]),
        pem_chain(&chain)
    )
}

/// A request for /internal/status presenting `leaf` and `rest` in one of three forms.
fn chain_request(form: &str, leaf: &str, rest: &[&str]) -> CheckRequest {
    let mut all = vec![leaf];
    all.extend_from_slice(rest);
    match form {
        "pem" => request("GET", WORKLOAD_PATH, Some(&pem_chain(&all)), None),
        "traefik" => request("GET", WORKLOAD_PATH, Some(&traefik_chain(&all)), None),
        "xfcc" => {
            let mut req = request("GET", WORKLOAD_PATH, None, None);
            set_header(&mut req, "x-forwarded-client-cert", xfcc_chain(leaf, rest));
            req
        }
        other => panic!("no form {other}"),
    }
}

impl Binary {
    /// Every audit line so far.
    fn audit_lines(&self) -> Vec<Value> {
        std::fs::read_to_string(self.path("audit.log"))
            .unwrap_or_default()
            .lines()
            .filter_map(|l| serde_json::from_str::<Value>(l).ok())
            .collect()
    }

    /// How many audit lines have a `reasons` entry containing `text`, once there are
    /// `expected` (audit lines are written by a background thread) or after 5 s.
    async fn audit_reasons(&self, text: &str, expected: usize) -> usize {
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            let n = self
                .audit_lines()
                .iter()
                .filter(|l| {
                    l["reasons"].as_array().is_some_and(|r| {
                        r.iter()
                            .any(|r| r.as_str().is_some_and(|r| r.contains(text)))
                    })
                })
                .count();
            if n >= expected || Instant::now() > deadline {
                return n;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

const JUNK: &str = "junk CA";
const UNAUTHENTICATED: (i32, i32) = (16, 401);

fn code_and_status(resp: &CheckResponse) -> (i32, i32) {
    let (code, status, _) = outcome(resp);
    (code, status)
}

// Finding 8: a leaf with 16 junk "intermediates" that issue each other (same name, keys of
// their own) made path building search every ordering: 120-180 ms of CPU per request,
// ending in MaximumPathBuildCallsExceeded, and legitimate requests waited behind it. Now a
// request may bring at most `max_request_intermediates` (4) besides copies of its leaf,
// refused before any path building, in every form a chain arrives in; within the cap,
// duplicates and certificates that cannot be on the leaf's path are dropped, and the worst
// orderings left finish far inside the deadline (a `deadline` answer would show otherwise).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_junk_chain_is_refused_before_path_building_and_others_stay_prompt() {
    let m = material();
    let server = server_with_peer("xfcc = \"nearest\"", "", &[]);
    let mut client = server.client().await;
    let leaf = junk_leaf(JUNK);
    let junk: Vec<String> = (0..16).map(|_| junk_ca(JUNK, JUNK)).collect();
    let junk: Vec<&str> = junk.iter().map(String::as_str).collect();

    // Over the cap, in all three forms: refused at once, with its own reason.
    let mut refused = 0;
    for form in ["pem", "traefik", "xfcc"] {
        for n in [16, 5] {
            let started = Instant::now();
            let resp = try_check(&mut client, chain_request(form, &leaf, &junk[..n]))
                .await
                .expect("RPC");
            let took = started.elapsed();
            assert_eq!(code_and_status(&resp), UNAUTHENTICATED, "{form}, {n} junk");
            assert!(took < ANSWER_BOUND, "{form}, {n} junk: took {took:?}");
            refused += 1;
        }
    }
    // Copies of the leaf (XFCC's Chain starts with it) do not count; duplicates do.
    let resp = try_check(
        &mut client,
        chain_request(
            "pem",
            &leaf,
            &[&leaf, &leaf, junk[0], junk[0], junk[1], junk[1], junk[2]],
        ),
    )
    .await
    .expect("RPC");
    assert_eq!(code_and_status(&resp), UNAUTHENTICATED, "duplicates count");
    refused += 1;
    // The duplicates' request counts as 5: its two leaf copies do not count.
    for (n, lines) in [(16, 3), (5, 4)] {
        assert_eq!(
            server
                .audit_reasons(
                    &format!(
                        "the request brought {n} intermediate certificates, more than the 4 allowed"
                    ),
                    lines
                )
                .await,
            lines,
            "audit lines for {n} junk intermediates"
        );
    }
    assert_eq!(
        server.audit_count("invalid_certificate", refused).await,
        refused
    );

    // Within the cap, the worst shapes: orderings of same-name certificates, some reaching
    // the trust anchor's name or the configured intermediate's (so signatures are checked).
    let root = "hostile test root CA";
    let inter = "hostile test intermediate CA";
    let shapes: Vec<(&str, String, Vec<String>)> = vec![
        (
            "4 same-name, issuing each other",
            junk_leaf(JUNK),
            (0..4).map(|_| junk_ca(JUNK, JUNK)).collect(),
        ),
        (
            "3 same-name + 1 under the root's name",
            junk_leaf(JUNK),
            (0..3)
                .map(|_| junk_ca(JUNK, JUNK))
                .chain([junk_ca(JUNK, root)])
                .collect(),
        ),
        (
            "3 same-name + 1 under the intermediate's name",
            junk_leaf(JUNK),
            (0..3)
                .map(|_| junk_ca(JUNK, JUNK))
                .chain([junk_ca(JUNK, inter)])
                .collect(),
        ),
        (
            "4 impostors of the configured intermediate",
            junk_leaf(inter),
            (0..2)
                .map(|_| junk_ca(inter, inter))
                .chain((0..2).map(|_| junk_ca(inter, root)))
                .collect(),
        ),
    ];
    let mut timings = Vec::new();
    for (what, leaf, rest) in &shapes {
        let rest: Vec<&str> = rest.iter().map(String::as_str).collect();
        let mut worst = Duration::ZERO;
        for form in ["pem", "traefik", "xfcc"] {
            for _ in 0..5 {
                let started = Instant::now();
                let resp = try_check(&mut client, chain_request(form, leaf, &rest))
                    .await
                    .expect("RPC");
                worst = worst.max(started.elapsed());
                // Not `deadline` (4, 503): the search ended well within request_timeout.
                assert_eq!(code_and_status(&resp), UNAUTHENTICATED, "{what} ({form})");
            }
        }
        timings.push(format!("{what}: worst {worst:?}"));
    }
    println!("within the cap: {timings:#?}");

    // The cap and the filter keep what a chain is for: a leaf from an intermediate the
    // server was not configured with verifies when the request brings that intermediate,
    // with unrelated certificates beside it, in every form.
    let extra_inter = m.root.intermediate("request-supplied intermediate CA");
    let leaf2 = extra_inter.issue(&LeafSpec::spiffe(READER)).pem;
    let unrelated = [junk_ca(JUNK, JUNK), junk_ca(JUNK, root), m.inter.cert_pem()];
    let inter_pem = extra_inter.cert_pem();
    for form in ["pem", "traefik", "xfcc"] {
        for rest in [
            vec![inter_pem.as_str()],
            vec![
                unrelated[0].as_str(),
                inter_pem.as_str(),
                unrelated[1].as_str(),
                unrelated[2].as_str(),
            ],
        ] {
            let resp = try_check(&mut client, chain_request(form, &leaf2, &rest))
                .await
                .expect("RPC");
            assert_eq!(
                outcome(&resp).0,
                0,
                "{form} with {} certificates: {:?}",
                rest.len(),
                outcome(&resp)
            );
            assert_eq!(
                ok_header(&resp, PRINCIPAL_HEADER).as_deref(),
                Some(format!("Workload::\"{READER}\"").as_str())
            );
        }
        // Without its intermediate it does not verify.
        let resp = try_check(&mut client, chain_request(form, &leaf2, &[]))
            .await
            .expect("RPC");
        assert_eq!(code_and_status(&resp), UNAUTHENTICATED, "{form} alone");
    }

    // Six clients send the 16-junk chain in a loop; valid requests from another client are
    // still answered correctly and in time.
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let attack = Arc::new(chain_request("pem", &leaf, &junk));
    let mut attackers = Vec::new();
    for _ in 0..6 {
        let (stop, attack) = (stop.clone(), attack.clone());
        let mut client = server.client().await;
        attackers.push(tokio::spawn(async move {
            let mut sent = 0usize;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let resp = try_check(&mut client, (*attack).clone())
                    .await
                    .expect("RPC");
                assert_eq!(code_and_status(&resp), UNAUTHENTICATED, "an attack request");
                sent += 1;
            }
            sent
        }));
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    let mut latencies = Vec::new();
    let until = Instant::now() + Duration::from_secs(3);
    while Instant::now() < until {
        let started = Instant::now();
        server.assert_serves("junk chains from six clients").await;
        latencies.push(started.elapsed());
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let mut attacks = 0;
    for a in attackers {
        attacks += a.await.expect("an attacker");
    }
    latencies.sort();
    println!(
        "{attacks} junk-chain requests from 6 clients; {} valid requests meanwhile, median {:?}, worst {:?}",
        latencies.len(),
        latencies[latencies.len() / 2],
        latencies[latencies.len() - 1]
    );
    assert!(attacks > 0);
}

// Finding 8: `request_timeout` was never enforced, because the decision is synchronous
// inside the timed future and the timer could only fire while a key refresh was awaited.
// Now the engine checks the deadline between its stages. A valid 8 MB token takes far more
// than 2 ms to decode and verify, so with request_timeout = 2ms its decision is the
// `deadline` denial (DEADLINE_EXCEEDED in a successful RPC), counted and audited; the same
// request is allowed when the timeout is the default.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_decision_past_request_timeout_is_denied_deadline() {
    let m = material();
    let mut claims = common::claims();
    claims["pad"] = json!("p".repeat(8 * MIB));
    let big = m.signer.sign(&claims);
    let limits = |timeout: &str| {
        format!(
            r#"
[limits]
request_timeout = "{timeout}"
max_message_bytes = 67108864
max_header_bytes = 67108864

[token]
max_size = 67108864
"#
        )
    };

    let patient = server(&limits("30s"));
    let resp = try_check(
        &mut patient.client().await,
        request("GET", VALID_PATH, None, Some(&big)),
    )
    .await
    .expect("RPC");
    assert_eq!(
        outcome(&resp).0,
        0,
        "the 8 MB token is valid: {:?}",
        outcome(&resp)
    );
    drop(patient);

    let server = server(&limits("2ms"));
    let mut client = server.client().await;
    for _ in 0..3 {
        let resp = try_check(&mut client, request("GET", VALID_PATH, None, Some(&big)))
            .await
            .expect("a deadline is a successful RPC");
        assert_eq!(outcome(&resp), (4, 503, None), "past request_timeout");
        assert_eq!(
            resp.status.as_ref().map(|s| s.message.as_str()),
            Some("deadline")
        );
    }
    assert_eq!(
        server.audit_count("deadline", 3).await,
        3,
        "audit: deadline"
    );
    assert_eq!(
        server
            .audit_reasons("no decision within the request timeout of 2ms", 3)
            .await,
        3,
        "audit: the reason says where the decision stood"
    );
    let metrics = reqwest_metrics(server.http_addr()).await;
    assert!(
        metrics
            .lines()
            .any(|l| l.contains("reason=\"deadline\"") && l.trim_end().ends_with(" 3")),
        "the deadline denials are counted:\n{metrics}"
    );
}

/// The admin listener's `/metrics` text.
async fn reqwest_metrics(http: SocketAddr) -> String {
    let mut s = TcpStream::connect(http).await.expect("connect to admin");
    s.write_all(b"GET /metrics HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n")
        .await
        .expect("write");
    let mut out = String::new();
    s.read_to_string(&mut out).await.expect("read");
    out
}
