//! nginx in front: `examples/nginx.conf` with `auth_request` to the forward-auth door.

use super::*;
use std::process::{Command, Stdio};

/// The nginx binary: `$NGINX`, else the first of the usual places, else `nginx` on PATH.
fn nginx_binary() -> PathBuf {
    if let Some(p) = std::env::var_os("NGINX") {
        return p.into();
    }
    for p in ["/usr/sbin/nginx", "/usr/local/sbin/nginx", "/usr/bin/nginx"] {
        if Path::new(p).exists() {
            return p.into();
        }
    }
    "nginx".into()
}

fn rewrite(conf: String, from: &str, to: &str, times: usize) -> String {
    super::rewrite("examples/nginx.conf", conf, from, to, times)
}

/// `examples/nginx.conf` with everything that touches the machine moved into `dir`, the
/// addresses replaced, and a single process (`master_process off`) for a clean kill.
fn test_config(dir: &Path, port: u16, portcullis: SocketAddr, upstream: SocketAddr) -> String {
    let conf = example("nginx.conf");
    let d = dir.display();
    let user = if running_as_root() { "user root;" } else { "" };
    let conf = rewrite(conf, "user www-data;", user, 1);
    let conf = rewrite(
        conf,
        "worker_processes auto;",
        "worker_processes 1;\nmaster_process off;",
        1,
    );
    let conf = rewrite(
        conf,
        "pid /run/nginx.pid;",
        &format!("pid {d}/nginx.pid;"),
        1,
    );
    let conf = rewrite(
        conf,
        "error_log /var/log/nginx/error.log warn;",
        "error_log stderr info;",
        1,
    );
    let conf = rewrite(
        conf,
        "access_log /var/log/nginx/access.log portcullis;",
        &format!(
            "access_log {d}/access.log portcullis;\n    \
             client_body_temp_path {d}/client_body;\n    \
             proxy_temp_path {d}/proxy;\n    \
             fastcgi_temp_path {d}/fastcgi;\n    \
             uwsgi_temp_path {d}/uwsgi;\n    \
             scgi_temp_path {d}/scgi;"
        ),
        1,
    );
    let conf = rewrite(
        conf,
        "server 127.0.0.1:9192;",
        &format!("server {portcullis};"),
        1,
    );
    let conf = rewrite(
        conf,
        "server 127.0.0.1:8080;",
        &format!("server {upstream};"),
        1,
    );
    let conf = rewrite(
        conf,
        "listen 443 ssl;",
        &format!("listen 127.0.0.1:{port} ssl;"),
        1,
    );
    rewrite(conf, "/etc/nginx/tls/", &format!("{d}/"), 3)
}

/// Starts nginx over the example in `dir` and waits (at most 10 s) until it has bound its
/// port (its pid file exists, written after the listening sockets are open) and accepts
/// connections. `Err(log)` if the port was taken in the meantime, for a retry.
fn launch(
    dir: &Path,
    port: u16,
    portcullis: SocketAddr,
    upstream: SocketAddr,
) -> Result<Front, String> {
    let conf = &test_config(dir, port, portcullis, upstream);
    let conf_path = dir.join("nginx.conf");
    std::fs::write(&conf_path, conf).expect("write nginx.conf");
    let pid_file = dir.join("nginx.pid");
    let _ = std::fs::remove_file(&pid_file);
    let stderr = dir.join("nginx.stderr");
    let log = std::fs::File::create(&stderr).expect("create nginx.stderr");
    let binary = nginx_binary();
    let child = Command::new(&binary)
        .arg("-p")
        .arg(dir)
        .arg("-c")
        .arg(&conf_path)
        .arg("-e")
        .arg("stderr")
        .arg("-g")
        .arg("daemon off;")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .unwrap_or_else(|e| {
            panic!(
                "cannot run nginx ({}): {e}. This test needs a real nginx with the \
                 auth_request module: `apt-get install nginx` (Debian/Ubuntu), or set NGINX \
                 to the binary",
                binary.display()
            )
        });
    let front = Front {
        kind: Kind::Nginx,
        child,
        host: "127.0.0.1",
        port,
        stderr,
    };
    front.wait_listening(conf, || pid_file.exists())
}

super::front_proxy_tests!(launch);
