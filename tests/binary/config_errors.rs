//! What an operator reads when a file is wrong, through the real binary: `validate` on a
//! configuration with several problems reports every one with its file, line and fix; a
//! missing key file is reported once, at the line of the key that names it; revocation list typos fail `validate` with their
//! line and the entry meant, and on reload leave the last good list serving; and `check
//! --explain` names a wrong audience and a certificate from another CA in words, while the
//! client's reply says no more than before.

use super::common::binary::run_command;
use super::common::eventually;
use crate::reload::binary::Setup;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// `portcullis validate --config NAME` in `dir`: (success, standard error).
fn validate(dir: &Path, name: &str) -> (bool, String) {
    let ran = run_command(
        &["validate", "--config", name],
        dir,
        Some("warn"),
        Duration::from_secs(20),
    );
    (ran.status.success(), ran.stderr)
}

#[test]
fn validate_reports_every_key_problem_at_once_with_its_line_and_fix() {
    let dir = tempfile::tempdir().unwrap();
    let config = "\
[server]
grpc = \"127.0.0.1:0\"
mdoe = \"enforce\"

[[issuer]]
issuer = \"https://idp.example.org\"
audiences = [\"orders\"]
jwks_file = \"idp.jwks.json\"
levway = \"30s\"
leeway = 30
max_lifetime = \"a day\"

[limits]
max_concurent = 8

[audit]
rotate_size = \"lots\"
";
    std::fs::write(dir.path().join("portcullis.toml"), config).unwrap();
    let (ok, err) = validate(dir.path(), "portcullis.toml");
    assert!(!ok, "{err}");
    let expected = [
        "portcullis.toml:3:1: unknown key `mdoe` in [server]; did you mean `mode`?",
        "portcullis.toml:9:1: unknown key `levway` in [issuer]; did you mean `leeway`?",
        "portcullis.toml:10:1: [issuer] leeway: expected a duration as a string, such as \"30s\" or \"5m\", found integer `30`",
        "portcullis.toml:11:1: [issuer] max_lifetime: expected a duration as a string, such as \"30s\" or \"5m\", found string \"a day\"",
        "portcullis.toml:14:1: unknown key `max_concurent` in [limits]; did you mean `max_concurrent`?",
        "portcullis.toml:17:1: [audit] rotate_size: expected a positive size as a string, such as \"64MiB\" or \"1GB\", found string \"lots\"",
    ];
    let lines: Vec<&str> = err.lines().filter_map(|l| l.strip_prefix("  - ")).collect();
    assert_eq!(lines, expected, "{err}");
    assert!(err.contains("6 problem(s)"), "{err}");
    // Not the list of every valid key.
    assert!(!err.contains("expected one of"), "{err}");
}

#[test]
fn problems_with_values_carry_the_line_of_their_key() {
    let dir = tempfile::tempdir().unwrap();
    let config = "\
[server]
grpc = \"nowhere\"
mode = \"maybe\"

[[issuer]]
issuer = \"https://idp.example.org\"
audiences = []
jwks_file = \"idp.jwks.json\"
algorithms = [\"HS256\"]
";
    std::fs::write(dir.path().join("portcullis.toml"), config).unwrap();
    let (ok, err) = validate(dir.path(), "portcullis.toml");
    assert!(!ok, "{err}");
    for needle in [
        "portcullis.toml:2:1: server.grpc: \"nowhere\" is not an address",
        "portcullis.toml:3:1: server.mode: \"maybe\" is not one of",
        "portcullis.toml:7:1: issuer #1 (\"https://idp.example.org\"): audiences must list",
        "portcullis.toml:9:1: issuer #1 (\"https://idp.example.org\"): algorithms: \"HS256\"",
    ] {
        assert!(err.contains(needle), "missing {needle:?} in\n{err}");
    }
}

#[test]
fn a_missing_key_file_is_reported_once() {
    let setup = Setup::new("# none\n", "");
    std::fs::remove_file(setup.path("idp.jwks.json")).unwrap();
    let (status, err) = setup.run("validate");
    assert!(!status.success(), "{err}");
    assert_eq!(err.matches("idp.jwks.json").count(), 1, "{err}");
    assert!(err.contains("1 problem(s)"), "{err}");
    // At the line of the key that names it.
    assert!(
        err.contains("portcullis.toml:11:1: issuer \"https://idp.test\": "),
        "{err}"
    );
}

/// Every typo of the revocation list fails `validate` with its line and the entry it
/// probably meant, instead of revoking a token id nobody has.
#[test]
fn revocation_list_typos_fail_validate_with_their_line() {
    for (typo, fix) in [
        (
            "sub alice",
            "no \"jti:\" or \"sub:\" prefix; did you mean \"sub:alice\"?",
        ),
        (
            "subject:alice",
            "unknown prefix \"subject\"; did you mean \"sub:alice\"?",
        ),
        (
            "SUB:alice",
            "unknown prefix \"SUB\"; did you mean \"sub:alice\"?",
        ),
        (
            "jit:tok-1",
            "unknown prefix \"jit\"; did you mean \"jti:tok-1\"?",
        ),
        (
            "alice",
            "no \"jti:\" or \"sub:\" prefix; write \"jti:<token id>\" or \"sub:<subject>\"",
        ),
        (
            "sub:alice bob",
            "\"sub:alice bob\" has whitespace in its value; write one entry per line",
        ),
    ] {
        let setup = Setup::new(&format!("# revoked\njti:old\n{typo}\n"), "");
        let (status, err) = setup.run("validate");
        assert!(!status.success(), "{typo}: {err}");
        assert!(
            err.contains(&format!("revoked.txt:3: {fix}")),
            "{typo}: {err}"
        );
    }
    let setup = Setup::new("# revoked\njti:old\nsub:alice\n", "");
    let (status, err) = setup.run("validate");
    assert!(status.success(), "{err}");
}

/// A good list revokes; a typo written while serving is refused, logged and counted, and
/// the last good list keeps serving.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_revocation_list_typo_on_reload_keeps_the_last_good_list() {
    let setup = Setup::new("sub:alice\n", "");
    let served = setup.serve();
    let token = setup.token("tok-1");
    assert!(
        !served.allowed(&token).await,
        "sub:alice revokes alice's token"
    );
    setup.replace("revoked.txt", "subject:alice\n");
    assert!(
        eventually(Duration::from_secs(10), || async {
            served.revocation_failures().await >= 1
        })
        .await,
        "the bad list was not refused"
    );
    assert!(!served.allowed(&token).await, "the last good list serves");
    assert!(
        served.log().contains("did you mean \\\"sub:alice\\\"?")
            || served.log().contains("did you mean \"sub:alice\"?"),
        "{}",
        served.log()
    );
    setup.replace("revoked.txt", "# none\n");
    assert!(
        eventually(Duration::from_secs(10), || async {
            served.allowed(&token).await
        })
        .await,
        "a good list after the bad one is applied"
    );
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

/// `portcullis check --explain` of the demo request of alice, with the shipped example's
/// configuration edited by `edit`: (stdout before the reply, the reply).
fn explain(edit: impl Fn(String) -> String) -> (String, String) {
    let tmp = tempfile::tempdir().unwrap();
    let repo = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    copy_dir(&repo.join("policies"), &tmp.path().join("policies"));
    copy_dir(&repo.join("examples"), &tmp.path().join("examples"));
    for out in ["demo", "other-demo"] {
        let ran = run_command(
            &["demo", "--out", out],
            tmp.path(),
            None,
            Duration::from_secs(20),
        );
        assert!(ran.status.success(), "{}", ran.stderr);
    }
    let config = tmp.path().join("examples/portcullis.toml");
    let text = std::fs::read_to_string(&config).unwrap();
    std::fs::write(&config, edit(text)).unwrap();
    let ran = run_command(
        &[
            "check",
            "--config",
            "examples/portcullis.toml",
            "--request",
            "demo/requests/alice-reads-order.json",
            "--explain",
        ],
        tmp.path(),
        Some("warn"),
        Duration::from_secs(20),
    );
    assert_eq!(ran.status.code(), Some(2), "{}{}", ran.stdout, ran.stderr);
    let (explained, reply) = ran
        .stdout
        .split_once("reply (CheckResponse)")
        .expect("a reply section");
    (explained.to_string(), reply.to_string())
}

#[test]
fn check_explains_a_wrong_audience_with_both_lists() {
    let (explained, reply) = explain(|t| {
        t.replace(
            "audiences = [\"orders\"]",
            "audiences = [\"payments\", \"billing\"]",
        )
    });
    let reason = "token audience is not accepted by this issuer: the token names \"orders\"; accepted: \"payments\", \"billing\"";
    assert!(explained.contains(reason), "{explained}");
    // The client learns no more than before: the code and a static body.
    assert!(
        !reply.contains("payments") && !reply.contains("names"),
        "{reply}"
    );
    assert!(reply.contains("\"message\": \"invalid_token\""), "{reply}");
}

#[test]
fn check_explains_a_certificate_from_another_ca_with_the_same_name() {
    // Another demo run: a CA and intermediate with the same names and other keys.
    let (explained, reply) = explain(|t| {
        t.replace("../demo/ca.pem", "../other-demo/ca.pem")
            .replace("../demo/intermediate.pem", "../other-demo/intermediate.pem")
    });
    let reason = "the certificate's signature does not verify with its issuer's key: was it issued by another CA with the same name?";
    assert!(explained.contains(reason), "{explained}");
    assert!(
        !explained.contains("InvalidSignatureForPublicKey"),
        "{explained}"
    );
    assert!(!reply.contains("signature"), "{reply}");
    assert!(
        reply.contains("\"message\": \"invalid_certificate\""),
        "{reply}"
    );
}

/// SECURITY: two issuers left with one id prefix would name the same `User` and `Group`
/// entities, so a partner identity provider could mint the main one's users and groups.
/// `validate` refuses it unless both set that prefix on purpose.
#[test]
fn two_issuers_with_one_default_id_prefix_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let demo = run_command(&["demo"], dir.path(), None, Duration::from_secs(60));
    assert!(demo.status.success(), "{}", demo.stderr);
    let jwks = std::fs::read_to_string(dir.path().join("demo/idp.jwks.json")).unwrap();
    std::fs::write(dir.path().join("a.json"), &jwks).unwrap();
    std::fs::write(dir.path().join("b.json"), &jwks).unwrap();
    std::fs::create_dir(dir.path().join("policies")).unwrap();
    std::fs::write(
        dir.path().join("policies/p.cedar"),
        "permit (principal, action, resource);",
    )
    .unwrap();
    let config = |a: &str, b: &str| {
        format!(
            "[[issuer]]\nissuer = \"https://idp.example.org\"\naudiences = [\"orders\"]\njwks_file = \"a.json\"\n{a}\n\
             [[issuer]]\nissuer = \"https://partner.example.com\"\naudiences = [\"orders\"]\njwks_file = \"b.json\"\n{b}\n"
        )
    };
    let write = |text: String| std::fs::write(dir.path().join("portcullis.toml"), text).unwrap();

    write(config("", ""));
    let (ok, err) = validate(dir.path(), "portcullis.toml");
    assert!(!ok, "{err}");
    assert!(
        err.contains("portcullis.toml:6:1: issuers \"https://idp.example.org\" and \"https://partner.example.com\" have the same id prefix (\"\")"),
        "{err}"
    );
    // One prefix left to the default and the other written as "": the same namespace.
    write(config("", "id_prefix = \"\""));
    assert!(!validate(dir.path(), "portcullis.toml").0);

    // Each its own prefix; or the same one, written on both on purpose.
    for (a, b) in [
        ("", "id_prefix = \"partner/\""),
        ("id_prefix = \"corp/\"", "id_prefix = \"corp/\""),
    ] {
        write(config(a, b));
        let (ok, err) = validate(dir.path(), "portcullis.toml");
        assert!(ok, "{a} / {b}: {err}");
    }
}
