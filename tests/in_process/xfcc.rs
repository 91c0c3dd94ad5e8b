//! x-forwarded-client-cert as a certificate source: trusted only when configured, the
//! nearest hop's element only, `Hash` checked against `Cert`, `Chain` as intermediates
//! (never as trust anchors).

use crate::common;

use common::{Authority, ClientCert, LeafSpec, request, sha256_hex};
use portcullis::config::Settings;
use portcullis::engine::{DenyReason, Engine};
use portcullis::identity::CertRejection;
use std::time::SystemTime;

fn engine(root: &Authority, xfcc: &str) -> (tempfile::TempDir, Engine) {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("ca.pem"), root.cert_pem()).unwrap();
    std::fs::create_dir(dir.path().join("policies")).unwrap();
    std::fs::write(
        dir.path().join("policies/p.cedar"),
        "permit (principal is Workload, action, resource);",
    )
    .unwrap();
    let text = format!(
        "[peer]\ntrust_bundle = \"ca.pem\"\ntrust_domains = [\"example.org\"]\nxfcc = \"{xfcc}\"\n[policy]\ndir = \"policies\"\n"
    );
    let engine = Engine::load(&Settings::from_toml(&text, dir.path()).unwrap()).unwrap();
    (dir, engine)
}

fn element(cert: &ClientCert, chain: Option<&str>) -> String {
    let mut e = format!(
        "By=spiffe://example.org/envoy;Hash={};Cert=\"{}\";Subject=\"CN=x\";URI=spiffe://example.org/w",
        sha256_hex(&cert.der),
        cert.envoy_encoded()
    );
    if let Some(chain) = chain {
        e.push_str(&format!(
            ";Chain=\"{}\"",
            portcullis::demo::envoy_url_encode(chain)
        ));
    }
    e
}

fn decide(engine: &Engine, xfcc: &str) -> portcullis::engine::Decision {
    let mut req = request("GET", "/x", None, None);
    common::set_header(&mut req, "x-forwarded-client-cert", xfcc);
    engine.check(&req, SystemTime::now())
}

#[test]
fn xfcc_is_ignored_unless_trusted() {
    let root = Authority::root("xfcc root");
    let good = root.issue(&LeafSpec::spiffe("spiffe://example.org/w"));
    let (_d, off) = engine(&root, "off");
    let d = decide(&off, &element(&good, None));
    assert_eq!(d.principal().as_deref(), Some("Anonymous::\"anonymous\""));
    assert!(!d.allowed());
    let (_d, on) = engine(&root, "nearest");
    let d = decide(&on, &element(&good, None));
    assert!(d.allowed(), "{:?}", d.reasons);
    assert_eq!(
        d.principal().as_deref(),
        Some("Workload::\"spiffe://example.org/w\"")
    );
}

#[test]
fn only_the_nearest_hop_counts() {
    let root = Authority::root("xfcc root");
    let good = root.issue(&LeafSpec::spiffe("spiffe://example.org/w"));
    let forged = Authority::root("forger").issue(&LeafSpec::spiffe("spiffe://example.org/w"));
    let (_d, e) = engine(&root, "nearest");
    // A client-supplied element first, the trusted proxy's element last: the last one is used.
    assert!(
        decide(
            &e,
            &format!("{},{}", element(&forged, None), element(&good, None))
        )
        .allowed()
    );
    // The other way round, the forged element is the nearest and is rejected.
    let d = decide(
        &e,
        &format!("{},{}", element(&good, None), element(&forged, None)),
    );
    assert!(
        matches!(
            d.denial,
            Some(DenyReason::Certificate(CertRejection::UnknownIssuer(_)))
        ),
        "{:?}",
        d.denial
    );
}

#[test]
fn the_hash_must_match_the_certificate() {
    let root = Authority::root("xfcc root");
    let good = root.issue(&LeafSpec::spiffe("spiffe://example.org/w"));
    let other = root.issue(&LeafSpec::spiffe("spiffe://example.org/w"));
    let (_d, e) = engine(&root, "nearest");
    let swapped = element(&good, None).replace(&sha256_hex(&good.der), &sha256_hex(&other.der));
    let d = decide(&e, &swapped);
    assert!(
        matches!(d.denial, Some(DenyReason::Certificate(CertRejection::Xfcc(ref m))) if m.contains("hash")),
        "{:?}",
        d.denial
    );
    // A malformed header fails the request rather than being skipped.
    let d = decide(&e, "Cert=\"unterminated");
    assert!(
        matches!(
            d.denial,
            Some(DenyReason::Certificate(CertRejection::Xfcc(_)))
        ),
        "{:?}",
        d.denial
    );
}

#[test]
fn chain_supplies_intermediates_but_never_anchors() {
    let root = Authority::root("xfcc root");
    let inter = root.intermediate("xfcc intermediate");
    let leaf = inter.issue(&LeafSpec::spiffe("spiffe://example.org/w"));
    let (_d, e) = engine(&root, "nearest");
    // Without the chain the intermediate is unknown (it is not configured).
    assert!(matches!(
        decide(&e, &element(&leaf, None)).denial,
        Some(DenyReason::Certificate(CertRejection::UnknownIssuer(_)))
    ));
    let chain = format!("{}{}", leaf.pem, inter.cert_pem());
    assert!(decide(&e, &element(&leaf, Some(&chain))).allowed());
    // A chain that brings its own root does not make that root trusted.
    let rogue_root = Authority::root("rogue");
    let rogue = rogue_root.issue(&LeafSpec::spiffe("spiffe://example.org/w"));
    let rogue_chain = format!("{}{}", rogue.pem, rogue_root.cert_pem());
    assert!(!decide(&e, &element(&rogue, Some(&rogue_chain))).allowed());
}
