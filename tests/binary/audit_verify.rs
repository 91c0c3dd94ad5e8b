//! `portcullis audit keygen | public-key | verify` as an operator runs them: a key made by
//! the binary, an audit log sealed and signed as docs/AUDIT.md specifies it (written here
//! from the document, independently of src/audit/chain.rs, so that the format and the
//! verifier are checked against each other), then cut, edited and reordered copies of it,
//! with the exit codes and the first broken line the command reports; and a real server's
//! signed audit file, as written and tampered with.

use crate::common::binary::{Binary, Ran, run_command};
use aws_lc_rs::digest::{SHA256, digest};
use aws_lc_rs::signature::Ed25519KeyPair;
use base64::Engine as _;
use rustls_pki_types::PrivatePkcs8KeyDer;
use rustls_pki_types::pem::PemObject;
use std::path::Path;
use std::time::Duration;

const LIMIT: Duration = Duration::from_secs(60);
/// Lines between checkpoints in the logs written here.
const EVERY: u64 = 4;

fn portcullis(dir: &Path, args: &[&str]) -> Ran {
    run_command(args, dir, Some("warn"), LIMIT)
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn sha256_hex(bytes: &[u8]) -> String {
    hex(digest(&SHA256, bytes).as_ref())
}

/// A log of `decisions` decision lines, a checkpoint signed by `key` after each `EVERY`
/// lines and one at the end, as docs/AUDIT.md describes the format.
fn signed_log(key: &Ed25519KeyPair, key_id: &str, decisions: usize) -> Vec<String> {
    let mut lines: Vec<String> = Vec::new();
    let mut prev = "0".repeat(64);
    let mut since = 0;
    let push = |lines: &mut Vec<String>, body: String, prev: &mut String| {
        let seq = lines.len();
        let line = format!(
            "{},\"seq\":{seq},\"prev\":\"{prev}\"}}",
            body.strip_suffix('}').unwrap()
        );
        *prev = sha256_hex(line.as_bytes());
        lines.push(line);
    };
    let checkpoint = |lines: &[String], prev: &str| {
        let covers = lines.len() - 1;
        let message = format!("portcullis-audit-checkpoint-v1\n{covers}\n{prev}\n{EVERY}\n");
        let sig = base64::engine::general_purpose::STANDARD.encode(key.sign(message.as_bytes()));
        format!(
            r#"{{"type":"checkpoint","time":"2026-12-03T15:00:00Z","covers":{covers},"head":"{prev}","every":{EVERY},"key_id":"{key_id}","sig":"{sig}"}}"#
        )
    };
    for i in 0..decisions {
        let body = format!(
            r#"{{"time":"2026-12-03T15:00:00Z","decision_id":"d{i}","request_id":"r{i}","decision":"allow","enforced":true,"reason":null,"principal":"User::\"alice\"","action":"Action::\"GET\"","resource":"Path::\"/\"","policies":["p0"],"reasons":[],"latency_us":12}}"#
        );
        push(&mut lines, body, &mut prev);
        since += 1;
        if since == EVERY || i + 1 == decisions {
            let body = checkpoint(&lines, &prev);
            push(&mut lines, body, &mut prev);
            since = 0;
        }
    }
    lines
}

/// The key `portcullis audit keygen` wrote to `path`, and its key id (as checkpoints carry it).
fn load_key(path: &Path) -> (Ed25519KeyPair, String) {
    let pem = std::fs::read(path).unwrap();
    let der = PrivatePkcs8KeyDer::from_pem_slice(&pem).unwrap();
    let key = Ed25519KeyPair::from_pkcs8(der.secret_pkcs8_der()).unwrap();
    let key_id = {
        use aws_lc_rs::signature::KeyPair;
        sha256_hex(key.public_key().as_ref())[..16].to_string()
    };
    (key, key_id)
}

fn write_log(path: &Path, lines: &[String]) {
    std::fs::write(path, format!("{}\n", lines.join("\n"))).unwrap();
}

#[test]
fn keygen_writes_a_private_key_once_and_public_key_prints_its_public_key() {
    let dir = tempfile::tempdir().unwrap();
    let made = portcullis(dir.path(), &["audit", "keygen", "--out", "key.pem"]);
    assert_eq!(made.status.code(), Some(0), "{}", made.stderr);
    assert!(
        made.stdout.starts_with("-----BEGIN PUBLIC KEY-----\n"),
        "{}",
        made.stdout
    );
    let key_path = dir.path().join("key.pem");
    let private = std::fs::read_to_string(&key_path).unwrap();
    // A PKCS#8 PEM block, generated just now by keygen (the label is assembled so that no
    // key-looking marker sits in the sources).
    let label = ["PRIVATE", "KEY"].join(" ");
    assert!(private.starts_with(&format!("-----BEGIN {label}-----\n")));
    assert!(PrivatePkcs8KeyDer::from_pem_slice(private.as_bytes()).is_ok());
    assert!(!made.stdout.contains(&private) && !made.stderr.contains(&private));
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(&key_path).unwrap().permissions().mode();
    assert_eq!(mode & 0o777, 0o600);

    // Never overwritten.
    let again = portcullis(dir.path(), &["audit", "keygen", "--out", "key.pem"]);
    assert_eq!(again.status.code(), Some(2), "{}", again.stderr);
    assert!(again.stderr.contains("key.pem"), "{}", again.stderr);
    assert_eq!(std::fs::read_to_string(&key_path).unwrap(), private);

    let public = portcullis(dir.path(), &["audit", "public-key", "key.pem"]);
    assert_eq!(public.status.code(), Some(0), "{}", public.stderr);
    assert_eq!(public.stdout, made.stdout);

    std::fs::write(dir.path().join("junk.pem"), "junk").unwrap();
    let junk = portcullis(dir.path(), &["audit", "public-key", "junk.pem"]);
    assert_eq!(junk.status.code(), Some(2));
    assert!(
        junk.stderr.contains("junk.pem: no PKCS#8 private key"),
        "{}",
        junk.stderr
    );
}

/// What `verify` must answer for one copy of the log.
struct Case {
    name: &'static str,
    lines: Vec<String>,
    /// The public key file given with --key.
    key: Option<&'static str>,
    code: i32,
    /// Pieces of its output, in plain words.
    says: &'static [&'static str],
}

#[test]
fn verify_finds_the_first_line_where_a_log_was_cut_edited_or_reordered() {
    let dir = tempfile::tempdir().unwrap();
    let made = portcullis(dir.path(), &["audit", "keygen", "--out", "key.pem"]);
    assert_eq!(made.status.code(), Some(0), "{}", made.stderr);
    std::fs::write(dir.path().join("public.pem"), &made.stdout).unwrap();
    let other = portcullis(dir.path(), &["audit", "keygen", "--out", "other.pem"]);
    std::fs::write(dir.path().join("other-public.pem"), &other.stdout).unwrap();

    let (key, key_id) = load_key(&dir.path().join("key.pem"));
    // 10 decisions: seq 0-3, checkpoint 4, 5-8, checkpoint 9, 10-11, checkpoint 12.
    let good = signed_log(&key, &key_id, 10);
    assert_eq!(good.len(), 13);

    let edit = |mut l: Vec<String>, i: usize| {
        l[i] = l[i].replace(r#""decision":"allow""#, r#""decision":"deny""#);
        l
    };
    let cases = vec![
        Case {
            name: "intact",
            lines: good.clone(),
            key: Some("public.pem"),
            code: 0,
            says: &["intact: 13 lines, seq 0 to 12; 3 checkpoints verified."],
        },
        Case {
            name: "intact, no key",
            lines: good.clone(),
            key: None,
            code: 0,
            says: &[
                "intact: 13 lines",
                "3 checkpoints not verified (no --key given)",
            ],
        },
        Case {
            name: "cut at the start",
            lines: good[5..].to_vec(),
            key: Some("public.pem"),
            code: 0,
            says: &["intact: 8 lines, seq 5 to 12 (starts mid-chain"],
        },
        Case {
            name: "tail unsigned",
            lines: good[..12].to_vec(),
            key: Some("public.pem"),
            code: 0,
            says: &["the last 2 lines after the last checkpoint are not signed"],
        },
        Case {
            name: "cut in the middle",
            lines: [&good[..2], &good[3..]].concat(),
            key: Some("public.pem"),
            code: 1,
            says: &[
                "BROKEN at",
                "line 3 (seq 3): seq is 3 where 2 should come: 1 line (seq 2) was cut here",
                "The 2 lines before it are intact.",
            ],
        },
        Case {
            name: "edited",
            lines: edit(good.clone(), 2),
            key: Some("public.pem"),
            code: 1,
            says: &[
                "line 4 (seq 3): prev does not match the line before: the line before was edited",
            ],
        },
        Case {
            name: "reordered",
            lines: {
                let mut l = good.clone();
                l.swap(1, 2);
                l
            },
            key: Some("public.pem"),
            code: 1,
            says: &[
                "line 2 (seq 2): seq is 2 where 1 should come",
                "or moved elsewhere",
            ],
        },
        Case {
            name: "duplicated",
            lines: {
                let mut l = good.clone();
                l.insert(2, l[1].clone());
                l
            },
            key: Some("public.pem"),
            code: 1,
            says: &["line 3 (seq 1): seq goes back to 1 where 2 should come"],
        },
        Case {
            name: "signed by another key",
            lines: good.clone(),
            key: Some("other-public.pem"),
            code: 1,
            says: &["line 5 (seq 4): the checkpoint is signed by another key"],
        },
    ];
    let log = dir.path().join("audit.log");
    for case in cases {
        write_log(&log, &case.lines);
        let mut args = vec!["audit", "verify", "audit.log"];
        if let Some(key) = case.key {
            args.extend(["--key", key]);
        }
        let ran = portcullis(dir.path(), &args);
        assert_eq!(
            ran.status.code(),
            Some(case.code),
            "{}: {}{}",
            case.name,
            ran.stdout,
            ran.stderr
        );
        for needle in case.says {
            assert!(
                ran.stdout.contains(needle),
                "{}: missing {needle:?} in {}",
                case.name,
                ran.stdout
            );
        }
    }
}

#[test]
fn verify_reads_rotated_files_oldest_first_and_exits_2_when_it_cannot_read() {
    let dir = tempfile::tempdir().unwrap();
    let made = portcullis(dir.path(), &["audit", "keygen", "--out", "key.pem"]);
    std::fs::write(dir.path().join("public.pem"), &made.stdout).unwrap();
    let (key, key_id) = load_key(&dir.path().join("key.pem"));
    let good = signed_log(&key, &key_id, 10);
    write_log(&dir.path().join("audit.log.1"), &good[..5]);
    write_log(&dir.path().join("audit.log"), &good[5..]);

    let args = [
        "audit",
        "verify",
        "audit.log.1",
        "audit.log",
        "--key",
        "public.pem",
    ];
    let ran = portcullis(dir.path(), &args);
    assert_eq!(ran.status.code(), Some(0), "{}{}", ran.stdout, ran.stderr);
    assert!(ran.stdout.starts_with("intact: 13 lines"), "{}", ran.stdout);

    // (arguments, what standard error says)
    let cases: [(&[&str], &str); 3] = [
        (
            &["audit", "verify", "missing.log"],
            "missing.log: cannot read",
        ),
        (
            &["audit", "verify", "audit.log", "--key", "key.pem"],
            "key.pem: no public key",
        ),
        (
            &["audit", "verify", "audit.log", "--key", "none.pem"],
            "none.pem: cannot read",
        ),
    ];
    for (args, says) in cases {
        let ran = portcullis(dir.path(), args);
        assert_eq!(ran.status.code(), Some(2), "{args:?}: {}", ran.stderr);
        assert!(ran.stderr.contains(says), "{args:?}: {}", ran.stderr);
    }
    // A usage error is neither "broken" (1) nor "cannot read" (2).
    let ran = portcullis(dir.path(), &["audit", "verify"]);
    assert_eq!(ran.status.code(), Some(64), "{}", ran.stderr);
    assert!(ran.stderr.contains("FILE"), "{}", ran.stderr);
}

/// The real server's audit file, signed with a key from `audit keygen`: it verifies, and a
/// copy of it cut, edited or reordered is reported at the right line.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_real_servers_signed_audit_log_verifies_and_tampering_is_found() {
    let dir = tempfile::tempdir().unwrap();
    let made = portcullis(dir.path(), &["audit", "keygen", "--out", "key.pem"]);
    assert_eq!(made.status.code(), Some(0), "{}", made.stderr);
    let public = dir.path().join("public.pem");
    std::fs::write(&public, &made.stdout).unwrap();
    let audit = dir.path().join("audit.log");
    crate::common::binary::write_file(
        dir.path(),
        "policies/policies.cedar",
        "permit (principal, action, resource);\n",
    );
    let config = format!(
        "[server]\ngrpc = \"127.0.0.1:0\"\n\n[policy]\ndir = \"policies\"\n\n\
         [log]\naudit = \"{}\"\n\n[audit]\nsigning_key = \"{}\"\ncheckpoint_every = 3\n",
        audit.display(),
        dir.path().join("key.pem").display()
    );
    // The server removes its directory when it stops: the copies are checked elsewhere.
    let work = tempfile::tempdir().unwrap();
    std::fs::copy(&public, work.path().join("public.pem")).unwrap();
    let server = Binary::start_in(dir, &config);
    for _ in 0..10 {
        // The reply waits for its line's write.
        server
            .check(crate::common::request("GET", "/x", None, None))
            .await;
    }
    let text = std::fs::read_to_string(&audit).unwrap();
    drop(server);
    // seq 0-2, checkpoint 3, 4-6, checkpoint 7, 8-10, checkpoint 11, 12: the last unsigned.
    let good: Vec<String> = text.lines().map(String::from).collect();
    assert_eq!(good.len(), 13, "{text}");

    let swapped = {
        let mut l = good.clone();
        l.swap(1, 2);
        l
    };
    let edited = {
        let mut l = good.clone();
        l[1] = l[1].replace(r#""decision":"allow""#, r#""decision":"deny""#);
        assert_ne!(l[1], good[1]);
        l
    };
    // (name, lines, exit code, what the report says)
    let cases: [(&str, Vec<String>, i32, &str); 5] = [
        (
            "as written",
            good.clone(),
            0,
            "intact: 13 lines, seq 0 to 12; 3 checkpoints verified; the last 1 line after the \
             last checkpoint is not signed",
        ),
        (
            "cut at the start",
            good[4..].to_vec(),
            0,
            "intact: 9 lines, seq 4 to 12 (starts mid-chain",
        ),
        (
            "cut",
            [&good[..1], &good[2..]].concat(),
            1,
            "line 2 (seq 2): seq is 2 where 1 should come: 1 line (seq 1) was cut here",
        ),
        (
            "edited",
            edited,
            1,
            "line 3 (seq 2): prev does not match the line before",
        ),
        (
            "reordered",
            swapped,
            1,
            "line 2 (seq 2): seq is 2 where 1 should come",
        ),
    ];
    let copy = work.path().join("audit.log");
    for (name, lines, code, says) in cases {
        write_log(&copy, &lines);
        let ran = portcullis(
            work.path(),
            &["audit", "verify", "audit.log", "--key", "public.pem"],
        );
        assert_eq!(
            ran.status.code(),
            Some(code),
            "{name}: {}{}",
            ran.stdout,
            ran.stderr
        );
        assert!(ran.stdout.contains(says), "{name}: {}", ran.stdout);
    }
}
