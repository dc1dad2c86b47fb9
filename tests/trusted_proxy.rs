//! Who the client is (issue 14, part 2), against real proxies: HAProxy's `send-proxy` and `send-proxy-v2` to
//! a `--proxy-protocol` listener, HAProxy's `option forwardfor` and nginx's `X-Forwarded-For` and
//! `Forwarded` to a `--trusted-proxy` one, and clients that lie. The client connects from 127.0.0.2, the
//! proxies and anteroom listen on 127.0.0.1, so the address the worker sees tells which one it was given.
//! Workers: php-cgi printing its `$_SERVER` (FastCGI), gunicorn printing its environ (HTTP).

mod common;

use std::io::Write;
use std::net::{SocketAddr, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use common::*;
use serde_json::Value;

/// The client's own address: on loopback, but not the proxies'.
const CLIENT: &str = "127.0.0.2";

/// anteroom started by hand: its readiness cannot be a plain GET when it expects a PROXY header.
struct Server {
    child: Child,
    port: u16,
    admin: u16,
    log: PathBuf,
    _dir: tempfile::TempDir,
}

impl Server {
    /// anteroom on a free port with `opts`, a php-cgi worker printing `$_SERVER`, and an admin listener.
    fn php(opts: &[&str]) -> Server {
        Server::php_script(opts, "tests/fixtures/server.php")
    }

    /// As [`Server::php`], serving `script` (from the repository's root).
    fn php_script(opts: &[&str], script: &str) -> Server {
        require("php-cgi");
        let script = root().join(script);
        let param = format!("SCRIPT_FILENAME={}", script.display());
        let mut args = opts.to_vec();
        args.extend([
            "--workers",
            "1",
            "--param",
            &param,
            "--env",
            "PHP_FCGI_MAX_REQUESTS=0",
            "--",
            "php-cgi",
        ]);
        Server::start(&args)
    }

    fn start(args: &[&str]) -> Server {
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("anteroom.log");
        let (port, admin) = (free_port(), free_port());
        let child = Command::new(BIN)
            .args(["--listen", &format!("127.0.0.1:{port}")])
            .args(["--admin", &format!("127.0.0.1:{admin}")])
            .arg("--access-log")
            .args(args)
            .env("ANTEROOM_LOG", "info")
            .current_dir(root())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .expect("anteroom starts");
        let s = Server {
            child,
            port,
            admin,
            log,
            _dir: dir,
        };
        wait_until(
            "anteroom's worker to be ready",
            Duration::from_secs(30),
            || {
                request(
                    s.admin_addr(),
                    b"GET /health/ready HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n",
                )
                .is_ok_and(|r| r.status == 200)
            },
        );
        s
    }

    fn addr(&self) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], self.port))
    }

    fn admin_addr(&self) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], self.admin))
    }

    fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    fn metric(&self, name: &str) -> f64 {
        let r = get(self.admin_addr(), "/metrics");
        metric(&r.text(), name).unwrap_or_else(|| panic!("no {name} in /metrics"))
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        signal(self.child.id(), libc_sigterm());
        if wait_timeout(&mut self.child, Duration::from_secs(10)).is_none() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// A real HAProxy with `body` (frontends and backends) after a minimal global and defaults section.
struct Haproxy {
    child: Child,
    _dir: tempfile::TempDir,
}

impl Haproxy {
    fn start(body: &str, ports: &[u16]) -> Haproxy {
        require("haproxy");
        let dir = tempfile::tempdir().unwrap();
        let conf = dir.path().join("haproxy.cfg");
        std::fs::write(
            &conf,
            format!(
                "global\n  maxconn 100\ndefaults\n  timeout connect 5s\n  timeout client 30s\n  \
                 timeout server 30s\n{body}"
            ),
        )
        .unwrap();
        let child = Command::new("haproxy")
            .arg("-db")
            .arg("-f")
            .arg(&conf)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("haproxy starts");
        for &p in ports {
            wait_until("haproxy to listen", Duration::from_secs(10), || {
                TcpStream::connect(("127.0.0.1", p)).is_ok()
            });
        }
        Haproxy { child, _dir: dir }
    }
}

impl Drop for Haproxy {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A connection to `to` from the address `from`.
fn connect_from(from: &str, to: SocketAddr) -> TcpStream {
    use socket2::{Domain, Socket, Type};
    let s = Socket::new(Domain::IPV4, Type::STREAM, None).unwrap();
    let local: SocketAddr = format!("{from}:0").parse().unwrap();
    s.bind(&local.into()).unwrap();
    s.connect(&to.into()).unwrap();
    let s: TcpStream = s.into();
    s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    s
}

/// Sends `prefix` (a PROXY header, or nothing), then a GET with `headers`, from `from` to `to`; returns the
/// worker's variables as JSON and the client's port.
fn vars_with(from: &str, to: SocketAddr, prefix: &[u8], headers: &str) -> (Value, u16) {
    let mut s = connect_from(from, to);
    let port = s.local_addr().unwrap().port();
    let mut req = prefix.to_vec();
    req.extend_from_slice(
        format!("GET /who HTTP/1.1\r\nHost: example.org\r\n{headers}Connection: close\r\n\r\n")
            .as_bytes(),
    );
    s.write_all(&req).unwrap();
    let r = read_response(&mut s).unwrap();
    assert_eq!(r.status, 200, "{}", r.text());
    (serde_json::from_slice(&r.body).unwrap(), port)
}

fn vars(from: &str, to: SocketAddr, headers: &str) -> (Value, u16) {
    vars_with(from, to, b"", headers)
}

fn s<'a>(v: &'a Value, k: &str) -> &'a str {
    v[k].as_str().unwrap_or("")
}

/// True when the server closes `s` without a byte of answer.
fn closed_silently(s: &mut TcpStream) -> bool {
    let mut buf = [0u8; 64];
    matches!(read_some(s, &mut buf), Ok(0) | Err(_))
}

#[test]
fn haproxy_send_proxy_v1_and_v2_give_the_real_client() {
    let a = Server::php(&["--proxy-protocol", "--trusted-proxy", "127.0.0.1"]);
    let (v1, v2) = (free_port(), free_port());
    let _h = Haproxy::start(
        &format!(
            "frontend v1\n  mode tcp\n  bind 127.0.0.1:{v1}\n  default_backend b1\n\
             backend b1\n  mode tcp\n  server s 127.0.0.1:{p} send-proxy\n\
             frontend v2\n  mode tcp\n  bind 127.0.0.1:{v2}\n  default_backend b2\n\
             backend b2\n  mode tcp\n  server s 127.0.0.1:{p} send-proxy-v2\n",
            p = a.port
        ),
        &[v1, v2],
    );
    for port in [v1, v2] {
        let (v, client_port) = vars(CLIENT, SocketAddr::from(([127, 0, 0, 1], port)), "");
        assert_eq!(s(&v, "REMOTE_ADDR"), CLIENT, "through {port}: {v}");
        assert_eq!(s(&v, "REMOTE_PORT"), client_port.to_string());
        // The address the client connected to, HAProxy's.
        assert_eq!(s(&v, "SERVER_ADDR"), "127.0.0.1");
    }
    // Each line is written once its answer has gone: the client may read the answer first.
    let named = || {
        (a.log_text().lines())
            .filter(|l| l.contains("127.0.0.2 - - ["))
            .count()
            >= 2
    };
    wait_until("the access lines", Duration::from_secs(5), named);
}

#[test]
fn proxy_protocol_refusals_close_that_connection_only() {
    let a = Server::php(&[
        "--proxy-protocol",
        "--trusted-proxy",
        "127.0.0.1",
        "--header-timeout",
        "2",
    ]);
    let v2 = free_port();
    let _h = Haproxy::start(
        &format!(
            "frontend v2\n  mode tcp\n  bind 127.0.0.1:{v2}\n  default_backend b2\n\
             backend b2\n  mode tcp\n  server s 127.0.0.1:{p} send-proxy-v2\n",
            p = a.port
        ),
        &[v2],
    );
    let through = SocketAddr::from(([127, 0, 0, 1], v2));
    // A request under way through HAProxy while others are refused.
    let mut slow = connect_from(CLIENT, through);
    slow.write_all(b"GET /slow HTTP/1.1\r\nHost: example.org\r\n")
        .unwrap();

    // A malformed header, a plain request without one, a truncated v2 header: each closed, unanswered.
    for bad in [
        &b"PROXY TCP4 1.2.3.4\r\nGET / HTTP/1.1\r\nHost: x\r\n\r\n"[..],
        b"GET / HTTP/1.1\r\nHost: x\r\n\r\n",
        b"\r\n\r\n\0\r\nQUIT\n\x21\x11\x00\x0c\x7f\x00",
    ] {
        let mut c = connect_from("127.0.0.1", a.addr());
        c.write_all(bad).unwrap();
        if bad.starts_with(b"\r\n") {
            c.shutdown(std::net::Shutdown::Write).unwrap();
        }
        assert!(
            closed_silently(&mut c),
            "{:?}",
            String::from_utf8_lossy(bad)
        );
    }
    slow.write_all(b"Connection: close\r\n\r\n").unwrap();
    let r = read_response(&mut slow).unwrap();
    assert_eq!(r.status, 200);
    let v: Value = serde_json::from_slice(&r.body).unwrap();
    assert_eq!(s(&v, "REMOTE_ADDR"), CLIENT);

    // A header that never ends: closed at --header-timeout.
    let mut late = connect_from("127.0.0.1", a.addr());
    late.write_all(b"PROXY TCP4 ").unwrap();
    assert!(closed_silently(&mut late));
    assert!(a.metric("anteroom_client_connections_bad_proxy_header_total") >= 4.0);
    assert!(
        a.log_text().contains("connection closed"),
        "{}",
        a.log_text()
    );

    // A v2 LOCAL header (a proxy's own health check): the connection's own peer stands.
    let local = b"\r\n\r\n\0\r\nQUIT\n\x20\x00\x00\x00";
    let (v, port) = vars_with("127.0.0.1", a.addr(), local, "");
    assert_eq!(s(&v, "REMOTE_ADDR"), "127.0.0.1");
    assert_eq!(s(&v, "REMOTE_PORT"), port.to_string());
    // A header from a peer that is not trusted: read past, its address ignored.
    let lie = b"PROXY TCP4 6.6.6.6 127.0.0.1 1111 80\r\n";
    let (v, _) = vars_with(CLIENT, a.addr(), lie, "");
    assert_eq!(s(&v, "REMOTE_ADDR"), CLIENT);
}

#[test]
fn nginx_in_front_is_believed_and_a_spoofing_client_is_not() {
    let a = Server::php(&[
        "--trusted-proxy",
        "127.0.0.1/32",
        "--trusted-proxy",
        "10.0.0.0/8",
    ]);
    let n = Nginx::start(&format!(
        "  location / {{\n   proxy_pass http://127.0.0.1:{};\n   proxy_set_header Host $host;\n   \
         proxy_set_header X-Forwarded-For $proxy_add_x_forwarded_for;\n   \
         # As if nginx had terminated TLS.\n   proxy_set_header X-Forwarded-Proto https;\n  }}",
        a.port
    ));
    // Through nginx: the client, and HTTPS.
    let (v, _) = vars(CLIENT, n.addr(), "");
    assert_eq!(s(&v, "REMOTE_ADDR"), CLIENT, "{v}");
    assert_eq!(s(&v, "REMOTE_PORT"), "0");
    assert_eq!(s(&v, "HTTPS"), "on");
    assert_eq!(s(&v, "REQUEST_SCHEME"), "https");
    assert_eq!(s(&v, "SERVER_PORT"), "443");
    // A spoofed chain through nginx: the rightmost address that is not trusted, the one nginx wrote.
    let (v, _) = vars(CLIENT, n.addr(), "X-Forwarded-For: 6.6.6.6, 10.9.9.9\r\n");
    assert_eq!(s(&v, "REMOTE_ADDR"), CLIENT, "{v}");
    // The header still reaches the app as the proxy sent it.
    assert_eq!(
        s(&v, "HTTP_X_FORWARDED_FOR"),
        "6.6.6.6, 10.9.9.9, 127.0.0.2"
    );
    // The client straight to anteroom, lying: not trusted, nothing changes, its headers are left.
    let (v, port) = vars(
        CLIENT,
        a.addr(),
        "X-Forwarded-For: 6.6.6.6\r\nX-Forwarded-Proto: https\r\nForwarded: for=6.6.6.6\r\n",
    );
    assert_eq!(s(&v, "REMOTE_ADDR"), CLIENT, "{v}");
    assert_eq!(s(&v, "REMOTE_PORT"), port.to_string());
    assert_eq!(s(&v, "HTTPS"), "");
    assert_eq!(s(&v, "REQUEST_SCHEME"), "http");
    assert_eq!(s(&v, "HTTP_X_FORWARDED_FOR"), "6.6.6.6");
    // The access log says who the clients were, not nginx (each line once its answer has gone).
    let named = || {
        (a.log_text().lines())
            .filter(|l| l.contains("127.0.0.2 - - ["))
            .count()
            >= 3
    };
    wait_until("the access lines", Duration::from_secs(5), named);
    let log = a.log_text();
    assert!(!log.contains("6.6.6.6 - - ["), "{log}");
}

#[test]
fn haproxy_forwardfor_and_nginx_forwarded() {
    // HAProxy's `option forwardfor` appends the client to X-Forwarded-For.
    let a = Server::php(&["--trusted-proxy", "127.0.0.1"]);
    let fwd = free_port();
    let _h = Haproxy::start(
        &format!(
            "frontend f\n  mode http\n  bind 127.0.0.1:{fwd}\n  option forwardfor\n  default_backend b\n\
             backend b\n  mode http\n  server s 127.0.0.1:{}\n",
            a.port
        ),
        &[fwd],
    );
    let (v, _) = vars(
        CLIENT,
        SocketAddr::from(([127, 0, 0, 1], fwd)),
        "X-Forwarded-For: 6.6.6.6\r\n",
    );
    assert_eq!(s(&v, "REMOTE_ADDR"), CLIENT, "{v}");

    // RFC 7239 when asked for: nginx sets Forwarded; an X-Forwarded-For is then the client's word.
    let b = Server::php(&[
        "--trusted-proxy",
        "127.0.0.1",
        "--forwarded-header",
        "forwarded",
    ]);
    let n = Nginx::start(&format!(
        "  location / {{\n   proxy_pass http://127.0.0.1:{};\n   \
         proxy_set_header Forwarded \"for=\\\"$remote_addr:$remote_port\\\";proto=https\";\n  }}",
        b.port
    ));
    let (v, port) = vars(CLIENT, n.addr(), "X-Forwarded-For: 6.6.6.6\r\n");
    assert_eq!(s(&v, "REMOTE_ADDR"), CLIENT, "{v}");
    assert_eq!(s(&v, "REMOTE_PORT"), port.to_string());
    assert_eq!(s(&v, "HTTPS"), "on");
}

#[test]
fn an_http_worker_gets_the_proxy_protocol_client_as_its_last_hop() {
    require("gunicorn");
    let a = Server::start(&[
        "--proxy-protocol",
        "--trusted-proxy",
        "127.0.0.1",
        "--workers",
        "1",
        "--worker-protocol",
        "http",
        "--",
        "gunicorn",
        "-w",
        "1",
        "--chdir",
        "tests/fixtures",
        "echo_origin_wsgi:app",
    ]);
    let v2 = free_port();
    let _h = Haproxy::start(
        &format!(
            "frontend v2\n  mode tcp\n  bind 127.0.0.1:{v2}\n  default_backend b2\n\
             backend b2\n  mode tcp\n  server s 127.0.0.1:{p} send-proxy-v2\n",
            p = a.port
        ),
        &[v2],
    );
    let (v, _) = vars(
        CLIENT,
        SocketAddr::from(([127, 0, 0, 1], v2)),
        "X-Forwarded-For: 6.6.6.6\r\n",
    );
    // Passed on as it came, with the peer anteroom saw appended, as any proxy does.
    assert_eq!(s(&v, "HTTP_X_FORWARDED_FOR"), "6.6.6.6, 127.0.0.2", "{v}");
}

/// The queue's per-client lines see the client a trusted proxy names: behind one nginx, two clients are two
/// lines, so one at its `--max-queue-per-client` does not refuse the other.
#[test]
fn the_queue_sees_the_client_nginx_names() {
    let a = Server::php_script(
        &[
            "--trusted-proxy",
            "127.0.0.1",
            "--max-queue-per-client",
            "1",
        ],
        "examples/php/index.php",
    );
    let n = Nginx::start(&format!(
        "  location / {{\n   proxy_pass http://127.0.0.1:{};\n   \
         proxy_set_header X-Forwarded-For $proxy_add_x_forwarded_for;\n  }}",
        a.port
    ));
    let to = n.addr();
    let send = |from: &'static str, path: &'static str| {
        std::thread::spawn(move || {
            let mut s = connect_from(from, to);
            let req = format!("GET {path} HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n");
            s.write_all(req.as_bytes()).unwrap();
            read_response(&mut s).unwrap().status
        })
    };
    // The one worker busy with the first client's request, and one more of its requests waiting.
    let busy = send(CLIENT, "/?ms=2000");
    std::thread::sleep(Duration::from_millis(500));
    let waiting = send(CLIENT, "/?ms=1");
    std::thread::sleep(Duration::from_millis(300));
    // The first client's line is full; the second client's is its own.
    assert_eq!(send(CLIENT, "/?third").join().unwrap(), 503);
    let other = send("127.0.0.3", "/?other");
    assert_eq!(other.join().unwrap(), 200);
    assert_eq!(busy.join().unwrap(), 200);
    assert_eq!(waiting.join().unwrap(), 200);
}
