//! Kubernetes ConfigMap and Secret volumes against the real binary (GitHub issue 15). The
//! kubelet never writes a mounted file in place: it writes a new timestamped directory,
//! points `..data` at it with one rename, and each key is a symlink `NAME -> ..data/NAME`
//! (kubelet `atomic_writer.go`). Every file the server reloads is mounted so here and
//! updated so while the server runs: policies with schema and entities (a broken version
//! keeps the last good and is reported), the peer trust bundle, an issuer's key file, the
//! revocation list and the gRPC listener's own certificate and key.

use crate::common;

use common::binary::Binary;
use common::{AUDIENCE, Authority, ISSUER, LeafSpec, TokenSigner, claims, eventually, outcome};
use jsonwebtoken::Algorithm;
use std::os::unix::fs::symlink;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

/// Bound on each wait for a reload to show.
const RELOAD: Duration = Duration::from_secs(10);

/// A directory laid out as the kubelet lays out a ConfigMap or Secret volume.
struct KubeVolume {
    dir: PathBuf,
    /// The timestamped directory `..data` points at now.
    current: String,
    keys: Vec<String>,
}

impl KubeVolume {
    /// Creates `dir` holding `files` (key, content) as the kubelet does.
    fn create(dir: &Path, files: &[(&str, String)]) -> KubeVolume {
        std::fs::create_dir_all(dir).expect("create volume directory");
        let current = Self::write_version(dir, files);
        symlink(&current, dir.join("..data")).expect("..data symlink");
        let mut volume = KubeVolume {
            dir: dir.to_path_buf(),
            current,
            keys: Vec::new(),
        };
        volume.link_keys(files);
        volume
    }

    /// A new timestamped directory holding `files`; its name.
    fn write_version(dir: &Path, files: &[(&str, String)]) -> String {
        static SEQ: AtomicU64 = AtomicU64::new(0);
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .expect("time after 1970");
        // The kubelet's name: `..` + UTC time (2006_01_02_15_04_05) + `.` + random digits;
        // a sequence number keeps two versions within one second apart.
        let date =
            time::OffsetDateTime::from_unix_timestamp(now.as_secs() as i64).expect("a valid time");
        let name = format!(
            "..{:04}_{:02}_{:02}_{:02}_{:02}_{:02}.{:09}{}",
            date.year(),
            u8::from(date.month()),
            date.day(),
            date.hour(),
            date.minute(),
            date.second(),
            now.subsec_nanos(),
            SEQ.fetch_add(1, Ordering::SeqCst)
        );
        let version = dir.join(&name);
        std::fs::create_dir(&version).expect("create version directory");
        for (key, content) in files {
            let file = version.join(key);
            if let Some(parent) = file.parent() {
                std::fs::create_dir_all(parent).expect("create volume sub-directory");
            }
            std::fs::write(file, content).expect("write volume file");
        }
        name
    }

    /// The user-visible `NAME -> ..data/NAME` symlinks: new keys linked, dropped keys
    /// unlinked. A key projected to a path with a directory (`items: path: certs/ca.pem`)
    /// is linked by its first component (`certs -> ..data/certs`), as the kubelet does.
    fn link_keys(&mut self, files: &[(&str, String)]) {
        let mut keys: Vec<String> = files
            .iter()
            .map(|(k, _)| k.split('/').next().unwrap_or(k).to_string())
            .collect();
        keys.dedup();
        for key in &keys {
            let link = self.dir.join(key);
            if std::fs::symlink_metadata(&link).is_err() {
                symlink(Path::new("..data").join(key), link).expect("key symlink");
            }
        }
        for old in self.keys.iter().filter(|k| !keys.contains(k)) {
            std::fs::remove_file(self.dir.join(old)).expect("remove key symlink");
        }
        self.keys = keys;
    }

    /// Replaces the whole content with `files` as the kubelet does: a new timestamped
    /// directory, `..data_tmp -> it`, `..data_tmp` renamed over `..data`, key symlinks
    /// updated, the old directory removed.
    fn update(&mut self, files: &[(&str, String)]) {
        let next = Self::write_version(&self.dir, files);
        let tmp = self.dir.join("..data_tmp");
        symlink(&next, &tmp).expect("..data_tmp symlink");
        std::fs::rename(&tmp, self.dir.join("..data")).expect("rename ..data_tmp over ..data");
        self.link_keys(files);
        let old = std::mem::replace(&mut self.current, next);
        std::fs::remove_dir_all(self.dir.join(old)).expect("remove old version");
    }
}

/// A server directory with the configuration's other files; volumes are added under it.
fn server_dir() -> tempfile::TempDir {
    tempfile::tempdir().expect("temp dir")
}

/// A plain (not ConfigMap) policy directory allowing everything, for tests of other files.
fn allow_all(dir: &Path) {
    std::fs::create_dir_all(dir.join("policies")).expect("mkdir policies");
    std::fs::write(
        dir.join("policies/allow.cedar"),
        "permit (principal, action, resource);\n",
    )
    .expect("write policy");
}

/// gRPC code of a Check of GET `path` with this certificate and token.
async fn check(server: &Binary, path: &str, cert: Option<&str>, token: Option<&str>) -> i32 {
    outcome(
        &server
            .check(common::request("GET", path, cert, token))
            .await,
    )
    .0
}

/// Polls until `path` with `cert` and `token` is allowed (`allowed`) or denied.
async fn becomes(
    server: &Binary,
    path: &str,
    cert: Option<&str>,
    token: Option<&str>,
    allowed: bool,
) -> bool {
    eventually(RELOAD, || async {
        (check(server, path, cert, token).await == 0) == allowed
    })
    .await
}

const SCHEMA: &str = include_str!("../../policies/schema.cedarschema");
const WORKLOAD: &str = "spiffe://example.org/ns/test/sa/w";

fn policy_only(path: &str) -> String {
    format!(
        "@id(\"only-{path}\")\npermit (principal in Group::\"readers\", action == Action::\"GET\", resource)\nwhen {{ resource.path == \"/{path}\" }};\n"
    )
}

fn entities(member: bool) -> String {
    let parents = if member {
        r#"[{ "type": "Group", "id": "readers" }]"#
    } else {
        "[]"
    };
    format!(
        r#"[{{ "uid": {{ "type": "Workload", "id": "{WORKLOAD}" }}, "attrs": {{}}, "parents": {parents} }},
{{ "uid": {{ "type": "Group", "id": "readers" }}, "attrs": {{}}, "parents": [] }}]"#
    )
}

fn policy_files(policy: &str, member: bool) -> Vec<(&'static str, String)> {
    vec![
        ("main.cedar", policy.to_string()),
        ("schema.cedarschema", SCHEMA.to_string()),
        ("entities.json", entities(member)),
    ]
}

/// Policies, schema and entities in one ConfigMap: a new policy, a policy the schema
/// refuses (the last good set keeps serving, `/readyz` says why) and new entities are
/// each picked up after a kubelet update.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn policies_schema_and_entities_in_a_configmap_are_reloaded() {
    let dir = server_dir();
    let ca = Authority::root("configmap policies CA");
    std::fs::write(dir.path().join("ca.pem"), ca.cert_pem()).expect("write CA");
    let cert = ca.issue(&LeafSpec::spiffe(WORKLOAD)).envoy_encoded();
    let cert = Some(cert.as_str());
    let mut volume = KubeVolume::create(
        &dir.path().join("policies"),
        &policy_files(&policy_only("a"), true),
    );
    let server = Binary::start_in(
        dir,
        "[server]\ngrpc = \"127.0.0.1:0\"\nhttp = \"127.0.0.1:0\"\n\
         [peer]\ntrust_bundle = \"ca.pem\"\ntrust_domains = [\"example.org\"]\n\
         [policy]\ndir = \"policies\"\nschema = \"policies/schema.cedarschema\"\n\
         entities = \"policies/entities.json\"\n[log]\naudit = \"audit.log\"\n",
    );
    assert_eq!(
        check(&server, "/a", cert, None).await,
        0,
        "{}",
        server.log()
    );
    assert_ne!(check(&server, "/b", cert, None).await, 0);

    volume.update(&policy_files(&policy_only("b"), true));
    assert!(
        becomes(&server, "/b", cert, None, true).await,
        "the new policy was not picked up:\n{}",
        server.log()
    );
    assert_ne!(check(&server, "/a", cert, None).await, 0);

    // Parses, would allow everything, but the schema refuses it.
    let broken = "@id(\"everything\")\npermit (principal, action, resource)\nwhen { resource.colour == \"red\" };\n";
    volume.update(&policy_files(broken, true));
    let reported = eventually(RELOAD, || async {
        server
            .http("GET", "/readyz", &[], "")
            .await
            .body
            .contains("last reload failed")
    })
    .await;
    let ready = server.http("GET", "/readyz", &[], "").await;
    assert!(
        reported,
        "the broken version was not reported: {ready:?}\n{}",
        server.log()
    );
    assert_eq!(ready.status, 200, "the last good set serves");
    assert!(ready.body.contains("main.cedar"), "{}", ready.body);
    assert_eq!(
        check(&server, "/b", cert, None).await,
        0,
        "the last good set serves"
    );
    assert_ne!(
        check(&server, "/c", cert, None).await,
        0,
        "the broken set never serves"
    );

    // The good policy again, with the workload out of the group: entities are reloaded.
    volume.update(&policy_files(&policy_only("b"), false));
    assert!(
        becomes(&server, "/b", cert, None, false).await,
        "the new entities were not picked up:\n{}",
        server.log()
    );
    assert!(
        !server
            .http("GET", "/readyz", &[], "")
            .await
            .body
            .contains("last reload failed"),
        "a good version clears the reported failure"
    );
}

/// The peer trust bundle in a ConfigMap: after an update to a new CA, its certificates
/// are accepted and the old CA's refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_trust_bundle_in_a_configmap_is_reloaded() {
    let dir = server_dir();
    allow_all(dir.path());
    let (old_ca, new_ca) = (
        Authority::root("configmap old CA"),
        Authority::root("configmap new CA"),
    );
    let old = old_ca.issue(&LeafSpec::spiffe(WORKLOAD)).envoy_encoded();
    let new = new_ca.issue(&LeafSpec::spiffe(WORKLOAD)).envoy_encoded();
    let mut volume =
        KubeVolume::create(&dir.path().join("trust"), &[("ca.pem", old_ca.cert_pem())]);
    let server = Binary::start_in(
        dir,
        "[server]\ngrpc = \"127.0.0.1:0\"\n\
         [peer]\ntrust_bundle = \"trust/ca.pem\"\ntrust_domains = [\"example.org\"]\n\
         [policy]\ndir = \"policies\"\n[log]\naudit = \"audit.log\"\n",
    );
    assert_eq!(
        check(&server, "/x", Some(&old), None).await,
        0,
        "{}",
        server.log()
    );
    assert_ne!(check(&server, "/x", Some(&new), None).await, 0);
    volume.update(&[("ca.pem", new_ca.cert_pem())]);
    assert!(
        becomes(&server, "/x", Some(&new), None, true).await,
        "the new CA was not picked up:\n{}",
        server.log()
    );
    assert_ne!(
        check(&server, "/x", Some(&old), None).await,
        0,
        "the old CA still trusted"
    );
}

/// A key projected into a sub-directory of the volume (`items: path: certs/ca.pem`): the
/// file's directory is itself a symlink into the timestamped directory, which the kubelet
/// deletes on each update. Two updates in a row are each picked up.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_trust_bundle_in_a_configmap_sub_directory_is_reloaded_each_time() {
    let dir = server_dir();
    allow_all(dir.path());
    let cas = [
        Authority::root("configmap first CA"),
        Authority::root("configmap second CA"),
        Authority::root("configmap third CA"),
    ];
    let certs: Vec<String> = cas
        .iter()
        .map(|ca| ca.issue(&LeafSpec::spiffe(WORKLOAD)).envoy_encoded())
        .collect();
    let mut volume = KubeVolume::create(
        &dir.path().join("trust"),
        &[("certs/ca.pem", cas[0].cert_pem())],
    );
    let server = Binary::start_in(
        dir,
        "[server]\ngrpc = \"127.0.0.1:0\"\n\
         [peer]\ntrust_bundle = \"trust/certs/ca.pem\"\ntrust_domains = [\"example.org\"]\n\
         [policy]\ndir = \"policies\"\n[log]\naudit = \"audit.log\"\n",
    );
    assert_eq!(
        check(&server, "/x", Some(&certs[0]), None).await,
        0,
        "{}",
        server.log()
    );
    for n in 1..cas.len() {
        volume.update(&[("certs/ca.pem", cas[n].cert_pem())]);
        assert!(
            becomes(&server, "/x", Some(&certs[n]), None, true).await,
            "update {n}: the new CA was not picked up:\n{}",
            server.log()
        );
        assert_ne!(check(&server, "/x", Some(&certs[n - 1]), None).await, 0);
    }
}

/// The server and one issuer whose keys are in `jwks` (a path in the server directory).
fn issuer_config(jwks: &str) -> String {
    format!(
        "[server]\ngrpc = \"127.0.0.1:0\"\n\
         [[issuer]]\nissuer = \"{ISSUER}\"\naudiences = [\"{AUDIENCE}\"]\n\
         jwks_file = \"{jwks}\"\nalgorithms = [\"ES256\"]\n"
    )
}

/// An issuer's key file in a Secret: after an update, a token signed by the new key is
/// accepted and one signed by the old refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_issuer_key_file_in_a_secret_is_reloaded() {
    let dir = server_dir();
    allow_all(dir.path());
    let old_key = TokenSigner::generate(Algorithm::ES256, "old");
    let new_key = TokenSigner::generate(Algorithm::ES256, "new");
    let (old, new) = (old_key.sign(&claims()), new_key.sign(&claims()));
    let mut volume = KubeVolume::create(
        &dir.path().join("keys"),
        &[("jwks.json", portcullis::demo::jwks(&[&old_key]))],
    );
    let server = Binary::start_in(
        dir,
        &format!(
            "{}[policy]\ndir = \"policies\"\n[log]\naudit = \"audit.log\"\n",
            issuer_config("keys/jwks.json")
        ),
    );
    assert_eq!(
        check(&server, "/x", None, Some(&old)).await,
        0,
        "{}",
        server.log()
    );
    assert_ne!(check(&server, "/x", None, Some(&new)).await, 0);
    volume.update(&[("jwks.json", portcullis::demo::jwks(&[&new_key]))]);
    assert!(
        becomes(&server, "/x", None, Some(&new), true).await,
        "the new key was not picked up:\n{}",
        server.log()
    );
    assert_ne!(
        check(&server, "/x", None, Some(&old)).await,
        0,
        "the old key still accepted"
    );
}

/// The revocation list in a ConfigMap: after an update, a token it names is refused; a
/// broken update keeps the last good list and is logged.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_revocation_list_in_a_configmap_is_reloaded() {
    let dir = server_dir();
    allow_all(dir.path());
    let key = TokenSigner::generate(Algorithm::ES256, "k");
    std::fs::write(
        dir.path().join("jwks.json"),
        portcullis::demo::jwks(&[&key]),
    )
    .expect("write keys");
    let mut stolen = claims();
    stolen["jti"] = "stolen-1".into();
    let stolen = key.sign(&stolen);
    let mut volume = KubeVolume::create(
        &dir.path().join("revocations"),
        &[("revoked.txt", "# none\n".to_string())],
    );
    let server = Binary::start_in(
        dir,
        &format!(
            "{}[token]\nrevoked = \"revocations/revoked.txt\"\n\
             [policy]\ndir = \"policies\"\n[log]\naudit = \"audit.log\"\n",
            issuer_config("jwks.json")
        ),
    );
    assert_eq!(
        check(&server, "/x", None, Some(&stolen)).await,
        0,
        "{}",
        server.log()
    );
    volume.update(&[("revoked.txt", "jti:stolen-1\n".to_string())]);
    assert!(
        becomes(&server, "/x", None, Some(&stolen), false).await,
        "the new revocation list was not picked up:\n{}",
        server.log()
    );
    // A broken version (an unknown prefix) keeps the last good list, and is reported.
    volume.update(&[("revoked.txt", "jti:other\nbogus:stolen-1\n".to_string())]);
    let reported = eventually(RELOAD, || async {
        server.log().contains("revocation list not reloaded")
    })
    .await;
    assert!(
        reported,
        "the broken list was not reported:\n{}",
        server.log()
    );
    assert_ne!(
        check(&server, "/x", None, Some(&stolen)).await,
        0,
        "the last good list serves"
    );
}

/// The gRPC listener's certificate and key in a Secret: after an update, new connections
/// are served the new certificate.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_listener_certificate_in_a_secret_is_reloaded() {
    let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
    let dir = server_dir();
    allow_all(dir.path());
    let (old_ca, new_ca) = (
        Authority::root("configmap old server CA"),
        Authority::root("configmap new server CA"),
    );
    let tls_files = |ca: &Authority| {
        let leaf = ca.issue(&LeafSpec::loopback_server());
        vec![("tls.crt", leaf.pem), ("tls.key", leaf.key_pem)]
    };
    let mut volume = KubeVolume::create(&dir.path().join("tls"), &tls_files(&old_ca));
    let server = Binary::start_in(
        dir,
        "[server]\ngrpc = \"127.0.0.1:0\"\n[server.tls]\ncert = \"tls/tls.crt\"\n\
         key = \"tls/tls.key\"\n[policy]\ndir = \"policies\"\n[log]\naudit = \"audit.log\"\n",
    );
    let addr = server.grpc.to_string();
    assert_eq!(
        check_tls(&addr, &old_ca.cert_pem()).await,
        Ok(0),
        "{}",
        server.log()
    );
    assert!(check_tls(&addr, &new_ca.cert_pem()).await.is_err());
    volume.update(&tls_files(&new_ca));
    let picked_up = eventually(RELOAD, || async {
        check_tls(&addr, &new_ca.cert_pem()).await == Ok(0)
    })
    .await;
    assert!(
        picked_up,
        "the new certificate was not picked up:\n{}",
        server.log()
    );
    assert!(
        check_tls(&addr, &old_ca.cert_pem()).await.is_err(),
        "the old certificate is still presented"
    );
}

/// One Check over a new TLS connection trusting only `server_ca`: its gRPC code, or why
/// there was none.
async fn check_tls(addr: &str, server_ca: &str) -> Result<i32, String> {
    use portcullis::proto::envoy::service::auth::v3::authorization_client::AuthorizationClient;
    use tonic::transport::{Certificate, ClientTlsConfig, Endpoint};
    let tls = ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(server_ca))
        .domain_name("localhost");
    let endpoint = Endpoint::from_shared(format!("https://{addr}"))
        .and_then(|e| e.tls_config(tls))
        .map_err(|e| format!("client configuration: {e}"))?
        .connect_timeout(Duration::from_secs(5))
        .timeout(Duration::from_secs(5));
    let channel = tokio::time::timeout(Duration::from_secs(5), endpoint.connect())
        .await
        .map_err(|_| "no connection in time".to_string())?
        .map_err(|e| format!("connect failed: {e:?}"))?;
    let reply = AuthorizationClient::new(channel)
        .check(common::request("GET", "/x", None, None))
        .await
        .map_err(|e| format!("Check failed: {e:?}"))?;
    Ok(reply.into_inner().status.map_or(-1, |s| s.code))
}
