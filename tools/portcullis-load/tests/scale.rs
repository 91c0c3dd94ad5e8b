//! The load tool as a user runs it: a smoke run of its `scale` mode at tiny sizes, against
//! the `portcullis` binary it starts from its own directory.

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// Builds the `portcullis` binary into the tool's directory, where the tool looks for it.
/// Cargo builds a package's own binaries for its tests, not those of its dependencies, so
/// this runs the same cargo with the same profile (a no-op when the binary is up to date) and
/// checks that the binary it reports is the one next to the tool, not a stale copy.
fn server_next_to(tool: &Path) {
    let dir = tool.parent().expect("the tool's directory");
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
    let mut cargo = Command::new(env!("CARGO"));
    cargo
        .args([
            "build",
            "--locked",
            "--package",
            "portcullis",
            "--bin",
            "portcullis",
        ])
        .arg("--message-format=json-render-diagnostics")
        .arg("--manifest-path")
        .arg(root.join("Cargo.toml"));
    // The directory is named for the profile, except that `dev` builds into `debug`.
    match dir.file_name().and_then(|name| name.to_str()) {
        Some("debug") => {}
        Some(profile) => {
            cargo.args(["--profile", profile]);
        }
        None => panic!("{}: no profile directory", tool.display()),
    }
    let out = cargo
        .stderr(Stdio::inherit())
        .output()
        .expect("run cargo build");
    assert!(out.status.success(), "cargo build --bin portcullis failed");
    let built = String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|line| serde_json::from_str::<serde_json::Value>(line).ok())
        .filter(|message| message["target"]["name"] == "portcullis")
        .find_map(|message| message["executable"].as_str().map(String::from))
        .expect("cargo reported no portcullis executable");
    let expected = dir.join("portcullis");
    assert!(
        std::fs::canonicalize(&built).ok() == std::fs::canonicalize(&expected).ok(),
        "cargo built {built}, but the tool starts {}: run the tests with CARGO_TARGET_DIR \
         rather than --target-dir or --target",
        expected.display()
    );
}

/// `portcullis-load scale --quick` at tiny sizes, bounded in time: every point starts,
/// answers every request as expected (the tool checks each one and fails otherwise), reloads
/// under load, and the CSV, plots and JSON are written.
#[test]
fn load_tool_scale_mode_runs_at_tiny_sizes() {
    const LIMIT: Duration = Duration::from_secs(240);
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("out");
    let log = tmp.path().join("load.log");
    server_next_to(Path::new(env!("CARGO_BIN_EXE_portcullis-load")));
    let mut child = Command::new(env!("CARGO_BIN_EXE_portcullis-load"))
        .args(["scale", "--quick", "--certs", "8", "--tokens", "8"])
        .args(["--connections", "1", "--concurrency", "2"])
        .args([
            "--entities",
            "10,300",
            "--policies",
            "40",
            "--load-timeout",
            "60s",
        ])
        .arg("--out")
        .arg(&out)
        .stdin(Stdio::null())
        .stdout(std::fs::File::create(&log).unwrap())
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .expect("run portcullis-load");
    let started = Instant::now();
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break Some(status);
        }
        if started.elapsed() > LIMIT {
            let _ = child.kill();
            let _ = child.wait();
            break None;
        }
        std::thread::sleep(Duration::from_millis(200));
    };
    let output = std::fs::read_to_string(&log).unwrap_or_default();
    assert!(
        status.is_some_and(|s| s.success()),
        "scale run failed or took over {LIMIT:?}:\n{output}"
    );
    for file in ["scale.csv", "scale-entities.svg", "scale-policies.svg"] {
        assert!(out.join(file).is_file(), "no {file}:\n{output}");
    }
    let summary: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("scale.json")).unwrap()).unwrap();
    let points = summary["points"].as_array().expect("points");
    assert_eq!(points.len(), 3, "{output}");
    for point in points {
        assert!(point["error"].is_null(), "{point}");
        assert!(point["reload"]["seconds"].as_f64().is_some(), "{point}");
    }
}
