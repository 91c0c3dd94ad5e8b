//! The `portcullis` binary as a user runs it: `demo`, `validate` and `check` on the shipped
//! example configuration and policies, and `validate` on broken input.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn portcullis(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_portcullis"))
        .args(args)
        .env("RUST_LOG", "warn")
        .output()
        .expect("run portcullis")
}

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for entry in std::fs::read_dir(from).unwrap() {
        let entry = entry.unwrap();
        if entry.path().is_file() {
            std::fs::copy(entry.path(), to.join(entry.file_name())).unwrap();
        }
    }
}

/// The shipped example laid out as in the repository, with fresh demo material.
fn example() -> (tempfile::TempDir, String) {
    let tmp = tempfile::tempdir().unwrap();
    copy_dir(&repo().join("policies"), &tmp.path().join("policies"));
    copy_dir(&repo().join("examples"), &tmp.path().join("examples"));
    let demo = tmp.path().join("demo");
    let out = portcullis(&["demo", "--out", demo.to_str().unwrap()]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let config = tmp
        .path()
        .join("examples/portcullis.toml")
        .display()
        .to_string();
    (tmp, config)
}

#[test]
fn the_shipped_example_validates_and_decides_the_demo_requests() {
    let (tmp, config) = example();
    let out = portcullis(&["validate", "--config", &config]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("validated strictly"));

    let cases = [
        ("alice-reads-order", true, "frontend-reads-orders"),
        ("batch-reads-catalog", true, "workloads-read-catalog"),
        (
            "alice-token-replayed-by-batch",
            false,
            "token is bound to a different certificate",
        ),
        ("mallory-reads-order", false, "no permit policy matched"),
        ("anonymous", false, "no permit policy matched"),
    ];
    for (name, allowed, needle) in cases {
        let req = tmp.path().join(format!("demo/requests/{name}.json"));
        let out = portcullis(&[
            "check",
            "--config",
            &config,
            "--request",
            req.to_str().unwrap(),
            "--explain",
        ]);
        let text = String::from_utf8_lossy(&out.stdout);
        assert_eq!(
            out.status.code(),
            Some(if allowed { 0 } else { 2 }),
            "{name}:\n{text}"
        );
        assert!(
            text.contains(if allowed {
                "decision:    ALLOW"
            } else {
                "decision:    DENY"
            }),
            "{name}:\n{text}"
        );
        assert!(
            text.contains(needle),
            "{name}: missing {needle:?} in\n{text}"
        );
        assert!(text.contains("reply (CheckResponse)"), "{name}");
    }
}

#[test]
fn check_explains_the_cedar_request() {
    let (tmp, config) = example();
    let req = tmp.path().join("demo/requests/alice-reads-order.json");
    let brief = portcullis(&[
        "check",
        "--config",
        &config,
        "--request",
        req.to_str().unwrap(),
    ]);
    let brief = String::from_utf8_lossy(&brief.stdout);
    assert!(
        brief.contains("decision:    ALLOW") && !brief.contains("cedar request:"),
        "{brief}"
    );
    let out = portcullis(&[
        "check",
        "--config",
        &config,
        "--request",
        req.to_str().unwrap(),
        "--explain",
    ]);
    let text = String::from_utf8_lossy(&out.stdout);
    for needle in [
        "principal: User::\"alice\" in [Group::\"order-readers\"]",
        "action:    Action::\"GET\"",
        "resource:  Path::\"/orders/42\"",
        "\"query\": \"expand=items\"",
        "\"spiffe_id\": \"spiffe://example.org/ns/prod/sa/frontend\"",
        "\"binding\": true",
        "bound to the presented certificate",
    ] {
        assert!(text.contains(needle), "missing {needle:?} in\n{text}");
    }
    // The explanation never prints the token itself.
    let token = std::fs::read_to_string(tmp.path().join("demo/tokens/alice.jwt")).unwrap();
    assert!(!text.contains(token.trim()));
    let sig = token.trim().rsplit('.').next().unwrap();
    assert!(!text.contains(sig));
}

#[test]
fn validate_reports_every_problem_with_its_location() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    std::fs::create_dir(dir.join("policies")).unwrap();
    std::fs::copy(
        repo().join("policies/schema.cedarschema"),
        dir.join("policies/schema.cedarschema"),
    )
    .unwrap();
    std::fs::write(
        dir.join("policies/a.cedar"),
        "@id(\"dup\")\npermit (principal, action, resource);\n",
    )
    .unwrap();
    std::fs::write(
        dir.join("policies/b.cedar"),
        "@id(\"dup\")\npermit (principal, action, resource);\n\n@id(\"typo\")\npermit (principal, action, resource)\nwhen { context.request.methd == \"GET\" };\n",
    )
    .unwrap();
    std::fs::write(
        dir.join("policies/c.cedar"),
        "permit (principal, action resource);\n",
    )
    .unwrap();
    std::fs::write(
        dir.join("bad.toml"),
        "[policy]\ndir = \"policies\"\nschema = \"policies/schema.cedarschema\"\n\n[[issuer]]\nissuer = \"https://idp\"\naudiences = [\"x\"]\njwks_file = \"missing.json\"\n",
    )
    .unwrap();
    let out = portcullis(&[
        "validate",
        "--config",
        dir.join("bad.toml").to_str().unwrap(),
    ]);
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    for needle in [
        "missing.json: cannot read",
        "duplicate policy id \"dup\"",
        "c.cedar:1:",
        "b.cedar:6:",
        "methd",
    ] {
        assert!(err.contains(needle), "missing {needle:?} in\n{err}");
    }

    std::fs::write(dir.join("unknown.toml"), "[server]\nlisten = \"x\"\n").unwrap();
    let out = portcullis(&[
        "validate",
        "--config",
        dir.join("unknown.toml").to_str().unwrap(),
    ]);
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("unknown.toml:2:1: unknown key `listen` in [server]"),
        "{err}"
    );
}
