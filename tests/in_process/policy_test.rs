//! `portcullis test` as a library call: the shipped policies pass their shipped cases; a
//! broken policy, a wrong expectation, an erroring policy and malformed case files are each
//! reported exactly.

use portcullis::policytest::{Report, run_dir};
use std::path::{Path, PathBuf};

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn copy_files(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for entry in std::fs::read_dir(from).unwrap() {
        let path = entry.unwrap().path();
        if path.is_file() {
            std::fs::copy(&path, to.join(path.file_name().unwrap())).unwrap();
        }
    }
}

/// A copy of the shipped policy directory, cases included.
fn shipped_copy() -> (tempfile::TempDir, PathBuf) {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("policies");
    copy_files(&repo().join("policies"), &dir);
    copy_files(&repo().join("policies/tests"), &dir.join("tests"));
    (tmp, dir)
}

fn edit(path: &Path, from: &str, to: &str) {
    let text = std::fs::read_to_string(path).unwrap();
    assert!(text.contains(from), "{} lacks {from:?}", path.display());
    std::fs::write(path, text.replacen(from, to, 1)).unwrap();
}

fn failures(report: &Report) -> Vec<&str> {
    report
        .lines
        .iter()
        .filter(|l| !l.starts_with("ok  "))
        .map(String::as_str)
        .collect()
}

const SHIPPED_CASES: usize = 29;

#[test]
fn the_shipped_policies_pass_their_cases() {
    let dir = repo().join("policies");
    let report = run_dir(&dir).unwrap_or_else(|e| panic!("{e:#?}"));
    assert_eq!(failures(&report), Vec::<&str>::new());
    assert_eq!((report.passed, report.failed), (SHIPPED_CASES, 0));
    assert_eq!(report.lines.len(), SHIPPED_CASES);
    assert_eq!(
        report.summary(),
        format!("{SHIPPED_CASES} passed, 0 failed")
    );
    let orders = dir.join("tests/orders.toml").display().to_string();
    let workloads = dir.join("tests/workloads.toml").display().to_string();
    // Files in name order, cases in file order.
    assert_eq!(
        report.lines[9],
        format!("ok  {orders}: alice reads an order from the frontend with a bound token")
    );
    assert_eq!(
        report.lines[21],
        format!("ok  {workloads}: the batch workload reads the catalog")
    );
}

#[test]
fn a_policy_that_no_longer_checks_binding_fails_exactly_the_unbound_case() {
    let (_tmp, dir) = shipped_copy();
    edit(
        &dir.join("orders.cedar"),
        "\"spiffe://example.org/ns/prod/sa/frontend\" &&\n  context.binding",
        "\"spiffe://example.org/ns/prod/sa/frontend\"",
    );
    let report = run_dir(&dir).unwrap_or_else(|e| panic!("{e:#?}"));
    assert_eq!((report.passed, report.failed), (SHIPPED_CASES - 1, 1));
    assert_eq!(
        failures(&report),
        [format!(
            "FAIL {}: alice reads an order from the frontend with an unbound token: \
             expected deny by [], got allow by [frontend-reads-orders]",
            dir.join("tests/orders.toml").display()
        )]
    );
    assert_eq!(
        report.summary(),
        format!("{} passed, 1 failed", SHIPPED_CASES - 1)
    );
}

#[test]
fn decision_and_policy_mismatches_say_what_was_expected_and_what_happened() {
    let (_tmp, dir) = shipped_copy();
    std::fs::remove_dir_all(dir.join("tests")).unwrap();
    std::fs::create_dir(dir.join("tests")).unwrap();
    let file = dir.join("tests/expect.toml");
    std::fs::write(
        &file,
        r#"
[[case]]
name = "right decision, wrong policy"
method = "GET"
path = "/orders/42"
peer = { spiffe_id = "spiffe://example.org/ns/prod/sa/frontend" }
token = { issuer = "https://idp.example.org", subject = "alice", groups = ["order-readers"], bound = true }
expect = "allow"
policies = ["admins-write-orders"]

[[case]]
name = "right decision, too few policies"
method = "GET"
path = "/orders/42"
peer = { spiffe_id = "spiffe://example.org/ns/prod/sa/frontend" }
token = { issuer = "https://idp.example.org", subject = "alice", groups = ["order-readers"], bound = true }
expect = "allow"
policies = []

[[case]]
name = "right decision, no policy expectation"
method = "GET"
path = "/orders/42"
peer = { spiffe_id = "spiffe://example.org/ns/prod/sa/frontend" }
token = { issuer = "https://idp.example.org", subject = "alice", groups = ["order-readers"], bound = true }
expect = "allow"

[[case]]
name = "expects a permit, a forbid decides"
method = "DELETE"
path = "/orders/1"
token = { issuer = "https://idp.example.org", subject = "olga", groups = ["order-admins"], scopes = ["orders:write"] }
expect = "allow"
policies = ["admins-write-orders"]

[[case]]
name = "expects allow, no permit matches"
method = "GET"
path = "/orders/1"
expect = "allow"
"#,
    )
    .unwrap();
    let report = run_dir(&dir).unwrap_or_else(|e| panic!("{e:#?}"));
    let f = file.display();
    assert_eq!(
        report.lines,
        [
            format!(
                "FAIL {f}: right decision, wrong policy: expected allow by [admins-write-orders], got allow by [frontend-reads-orders]"
            ),
            format!(
                "FAIL {f}: right decision, too few policies: expected allow by [], got allow by [frontend-reads-orders]"
            ),
            format!("ok  {f}: right decision, no policy expectation"),
            format!(
                "FAIL {f}: expects a permit, a forbid decides: expected allow by [admins-write-orders], got deny 403 forbidden by [no-deletes-without-mtls] (forbid matched)"
            ),
            format!(
                "FAIL {f}: expects allow, no permit matches: expected allow, got deny 401 no_permit by [] (no permit matched)"
            ),
        ]
    );
    assert_eq!((report.passed, report.failed), (1, 4));
}

#[test]
fn an_erroring_policy_denies_and_its_error_is_reported() {
    // Without a schema nothing stops a policy from reading an absent attribute.
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    std::fs::write(
        dir.join("p.cedar"),
        "@id(\"reads-token\")\npermit (principal, action, resource) when { context.token.subject == \"alice\" };\n\
         @id(\"all\")\npermit (principal, action, resource);\n",
    )
    .unwrap();
    std::fs::create_dir(dir.join("tests")).unwrap();
    let file = dir.join("tests/t.toml");
    std::fs::write(
        &file,
        r#"
[[case]]
name = "anonymous, expected allow"
method = "GET"
path = "/"
expect = "allow"

[[case]]
name = "anonymous, expected deny"
method = "GET"
path = "/"
expect = "deny"

[[case]]
name = "alice"
method = "GET"
path = "/"
token = { issuer = "https://idp", subject = "alice" }
expect = "allow"
policies = ["all", "reads-token"]
"#,
    )
    .unwrap();
    let report = run_dir(dir).unwrap_or_else(|e| panic!("{e:#?}"));
    assert_eq!((report.passed, report.failed), (2, 1));
    let f = file.display();
    let fail = &report.lines[0];
    // Cedar allowed through `all`, but the erroring policy forces a deny.
    let head = format!(
        "FAIL {f}: anonymous, expected allow: expected allow, got deny 403 policy_error by [all] (an evaluation error forces a deny: "
    );
    assert!(fail.starts_with(&head), "{fail}");
    assert!(fail.contains("reads-token"), "{fail}");
    assert!(fail.contains("`token`"), "{fail}");
    assert!(
        report.lines[1].starts_with(&format!(
            "ok  {f}: anonymous, expected deny (denied by evaluation error: "
        )),
        "{}",
        report.lines[1]
    );
    assert_eq!(report.lines[2], format!("ok  {f}: alice"));
}

#[test]
fn a_malformed_case_file_is_an_error_naming_file_line_and_case() {
    let (_tmp, dir) = shipped_copy();
    let bad = dir.join("tests/bad.toml");
    std::fs::write(
        &bad,
        "[[case]]\nname = \"fine\"\nmethod = \"GET\"\npath = \"/\"\nexpect = \"deny\"\n\n\
         [[case]]\nname = \"typo\"\nmethod = \"GET\"\npath = \"/\"\nexpected = \"deny\"\n",
    )
    .unwrap();
    let problems = run_dir(&dir).unwrap_err().messages();
    assert_eq!(problems.len(), 1, "{problems:#?}");
    let head = format!(
        "{}:11:1: case \"typo\": unknown field `expected`, expected one of",
        bad.display()
    );
    assert!(problems[0].starts_with(&head), "{}", problems[0]);
}

#[test]
fn every_loading_problem_is_reported_at_once() {
    let (_tmp, dir) = shipped_copy();
    edit(
        &dir.join("workloads.cedar"),
        "permit (\n  principal,",
        "permit (\n  principle,",
    );
    let more = dir.join("tests/more.toml");
    std::fs::write(
        &more,
        "[[case]]\nname = \"a\"\nmethod = \"GET\"\npath = \"/\"\nexpect = \"deny\"\n\
         peer = { spiffe_id = \"https://example.org/x\" }\n\
         token = { issuer = \"https://idp\", subject = \"s\", bound = true }\n\n\
         [[case]]\nname = \"b\"\nmethod = \"GET\"\npath = \"/\"\nexpect = \"deny\"\n\
         token = { issuer = \"https://idp\", subject = \"s\", bound = true }\n\n\
         [[case]]\nname = \"c\"\nmethod = \"GET\"\npath = \"/\"\nexpect = \"deny\"\n\
         policies = [\"no-such-policy\"]\n",
    )
    .unwrap();
    let problems = run_dir(&dir).unwrap_err().messages();
    let m = more.display();
    let workloads = dir.join("workloads.cedar").display().to_string();
    // The policy problems first, then the cases'; an invalid peer is not also reported as
    // a missing one.
    let (policy, cases) = problems.split_at(problems.len() - 2);
    assert!(!policy.is_empty(), "{problems:#?}");
    for p in policy {
        assert!(p.starts_with(&format!("{workloads}:")), "{problems:#?}");
    }
    assert_eq!(
        cases,
        [
            format!(
                "{m}:1: case \"a\": peer.spiffe_id: \"https://example.org/x\" is not a spiffe:// URI"
            ),
            format!(
                "{m}:9: case \"b\": token.bound = true needs a peer: a token is bound to a certificate"
            ),
        ]
    );

    // With those fixed, the unknown policy id is reported instead of failing the case.
    edit(
        &dir.join("workloads.cedar"),
        "permit (\n  principle,",
        "permit (\n  principal,",
    );
    edit(&more, "https://example.org/x", "spiffe://example.org/x");
    edit(
        &more,
        "subject = \"s\", bound = true }\n\n[[case]]\nname = \"c\"",
        "subject = \"s\" }\n\n[[case]]\nname = \"c\"",
    );
    let problems = run_dir(&dir).unwrap_err().messages();
    assert_eq!(problems.len(), 1, "{problems:#?}");
    assert!(
        problems[0].starts_with(&format!(
            "{m}:16: case \"c\": no policy has id \"no-such-policy\" (known: [admins-write-orders, "
        )),
        "{}",
        problems[0]
    );
}

#[test]
fn a_directory_without_cases_is_an_error() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("policies");
    copy_files(&repo().join("policies"), &dir);
    let problems = run_dir(&dir).unwrap_err().messages();
    assert_eq!(problems.len(), 1, "{problems:#?}");
    assert!(
        problems[0].starts_with(&format!(
            "{}: cannot read the test directory",
            dir.join("tests").display()
        )),
        "{}",
        problems[0]
    );

    std::fs::create_dir(dir.join("tests")).unwrap();
    std::fs::write(dir.join("tests/notes.txt"), "not a case file").unwrap();
    assert_eq!(
        run_dir(&dir).unwrap_err().messages(),
        [format!(
            "{}: no *.toml test files",
            dir.join("tests").display()
        )]
    );
}
