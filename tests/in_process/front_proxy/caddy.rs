//! Caddy in front: `examples/Caddyfile` with `forward_auth` to the forward-auth door.

use super::*;
use std::process::{Command, Stdio};

/// The caddy binary: `$CADDY`, else `/usr/bin/caddy`, else `caddy` on PATH.
fn caddy_binary() -> PathBuf {
    if let Some(p) = std::env::var_os("CADDY") {
        return p.into();
    }
    if Path::new("/usr/bin/caddy").exists() {
        return "/usr/bin/caddy".into();
    }
    "caddy".into()
}

fn rewrite(conf: String, from: &str, to: &str, times: usize) -> String {
    super::rewrite("examples/Caddyfile", conf, from, to, times)
}

/// `examples/Caddyfile` for a temporary directory: the site served as `localhost` on
/// 127.0.0.1:`port` (a site with client authentication needs a name: Caddy checks that the
/// TLS server name and the Host agree), the TLS files in `dir`, the addresses replaced, and
/// no automatic HTTPS (it would also listen on port 80 for redirects).
fn test_config(dir: &Path, port: u16, portcullis: SocketAddr, upstream: SocketAddr) -> String {
    let conf = example("Caddyfile");
    let d = dir.display();
    let conf = rewrite(conf, "\tadmin off\n", "\tadmin off\n\tauto_https off\n", 1);
    let conf = rewrite(
        conf,
        "api.example.org {",
        &format!("https://localhost:{port} {{\n\tbind 127.0.0.1"),
        1,
    );
    let conf = rewrite(conf, "/etc/caddy/tls/", &format!("{d}/"), 3);
    let conf = rewrite(
        conf,
        "forward_auth 127.0.0.1:9192 {",
        &format!("forward_auth {portcullis} {{"),
        1,
    );
    rewrite(
        conf,
        "reverse_proxy 127.0.0.1:8080",
        &format!("reverse_proxy {upstream}"),
        1,
    )
}

/// Starts Caddy over the example in `dir`, with its data and configuration directories
/// there too, and waits until it accepts connections.
fn launch(
    dir: &Path,
    port: u16,
    portcullis: SocketAddr,
    upstream: SocketAddr,
) -> Result<Front, String> {
    let conf = test_config(dir, port, portcullis, upstream);
    let conf_path = dir.join("Caddyfile");
    std::fs::write(&conf_path, &conf).expect("write Caddyfile");
    let stderr = dir.join("caddy.stderr");
    let log = std::fs::File::create(&stderr).expect("create caddy.stderr");
    let binary = caddy_binary();
    let child = Command::new(&binary)
        .args(["run", "--adapter", "caddyfile", "--config"])
        .arg(&conf_path)
        .env("HOME", dir)
        .env("XDG_DATA_HOME", dir.join("data"))
        .env("XDG_CONFIG_HOME", dir.join("config"))
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .unwrap_or_else(|e| {
            panic!(
                "cannot run caddy ({}): {e}. This test needs Caddy 2.6 or later: \
                 `apt-get install caddy` (Debian/Ubuntu), or set CADDY to the binary",
                binary.display()
            )
        });
    let front = Front {
        kind: Kind::Caddy,
        child,
        host: "localhost",
        port,
        stderr,
    };
    front.wait_listening(&conf, || true)
}

super::front_proxy_tests!(launch);
