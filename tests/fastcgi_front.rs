//! anteroom as the server of nginx's fastcgi_pass: real nginx, real php-cgi, Perl and Python workers,
//! cgi-fcgi, php-fpm for params parity, and a multiplexing client that aborts and hangs up.

mod common;

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use anteroom::fastcgi::{self as fcgi, BeginRequest, EndRequest};
use bytes::BytesMut;
use common::*;

fn sock(dir: &Path, name: &str) -> PathBuf {
    dir.join(name)
}

/// nginx's side: (http-level extra, server-level locations).
fn fastcgi_location(sock: &Path, keep_conn: bool, script: Option<&Path>) -> (String, String) {
    let script = script.map_or(String::new(), |s| {
        format!("fastcgi_param SCRIPT_FILENAME {};", s.display())
    });
    let (upstream, pass) = if keep_conn {
        (
            format!(
                "upstream ant {{ server unix:{}; keepalive 4; }}",
                sock.display()
            ),
            "fastcgi_keep_conn on;\n fastcgi_pass ant;".to_string(),
        )
    } else {
        (
            String::new(),
            format!("fastcgi_pass unix:{};", sock.display()),
        )
    };
    (
        upstream,
        format!("  server_name test;\n  location / {{\n include /etc/nginx/fastcgi_params;\n {script}\n {pass}\n  }}"),
    )
}

/// anteroom with an HTTP listener (for readiness) and a FastCGI one at `fsock`.
fn anteroom_fcgi(fsock: &Path, extra: &[&str]) -> Anteroom {
    let listen = format!("unix:{}", fsock.display());
    let mut args = vec!["--listen-fastcgi", listen.as_str()];
    args.extend_from_slice(extra);
    // Ready when it answers at all: a PHP worker with no script answers 404.
    Anteroom::start_env(&args, &[], None)
}

fn through_nginx(keep_conn: bool, worker: &[&str], script: Option<&Path>, needle: &str) {
    let dir = tempfile::tempdir().unwrap();
    let fsock = sock(dir.path(), "a.sock");
    let mut args = vec!["--workers", "2", "--env", "PHP_FCGI_MAX_REQUESTS=0", "--"];
    args.extend_from_slice(worker);
    let a = anteroom_fcgi(&fsock, &args);
    let (upstream, locations) = fastcgi_location(&fsock, keep_conn, script);
    let n = Nginx::start_with(&upstream, &locations);
    for i in 0..5 {
        let r = get(n.addr(), &format!("/hello/{i}?q={i}"));
        assert_eq!(
            r.status,
            200,
            "{}\nnginx: {}\nanteroom: {}",
            r.text(),
            n.error_log(),
            a.log_text()
        );
        assert!(r.text().contains(needle), "{}", r.text());
        assert!(
            r.text().contains(&format!("/hello/{i}?q={i}")),
            "{}",
            r.text()
        );
    }
    let r = request(
        n.addr(),
        b"POST /form HTTP/1.1\r\nHost: t\r\nContent-Type: text/plain\r\nContent-Length: 5\r\nConnection: close\r\n\r\nhello",
    )
    .unwrap();
    assert_eq!(r.status, 200, "{}", r.text());
    assert!(r.text().contains("body: hello"), "{}", r.text());
}

#[test]
fn nginx_fastcgi_pass_to_php_cgi_with_and_without_keep_conn() {
    require("php-cgi");
    let script = root().join("examples/php/index.php");
    for keep in [false, true] {
        through_nginx(keep, &["php-cgi"], Some(&script), "Hello from PHP");
    }
}

#[test]
fn nginx_fastcgi_pass_to_perl_psgi() {
    require("plackup");
    for keep in [false, true] {
        through_nginx(
            keep,
            &[
                "plackup",
                "-s",
                "FCGI",
                "--manager=",
                "examples/perl/app.psgi",
            ],
            None,
            "Hello from Perl",
        );
    }
}

#[test]
fn nginx_fastcgi_pass_to_python_flup() {
    require("python3");
    for keep in [false, true] {
        through_nginx(
            keep,
            &["python3", "examples/python/app_flup.py"],
            None,
            "Hello from Python",
        );
    }
}

#[test]
fn cgi_fcgi_works_and_httpoxy_is_dropped() {
    require("cgi-fcgi");
    require("php-cgi");
    let dir = tempfile::tempdir().unwrap();
    let fsock = sock(dir.path(), "a.sock");
    let _a = anteroom_fcgi(&fsock, &["--workers", "1", "--", "php-cgi"]);
    let out = Command::new("cgi-fcgi")
        .args(["-bind", "-connect", fsock.to_str().unwrap()])
        .env_clear()
        .env("REQUEST_METHOD", "GET")
        .env("SCRIPT_FILENAME", root().join("tests/fixtures/server.php"))
        .env("REQUEST_URI", "/x?y=1")
        .env("QUERY_STRING", "y=1")
        .env("HTTP_PROXY", "http://evil.example/")
        .env("HTTP_X_THING", "kept")
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.starts_with("Status: 200"), "{text}");
    let json = &text[text.find('{').unwrap()..];
    let vars: BTreeMap<String, serde_json::Value> = serde_json::from_str(json).unwrap();
    assert_eq!(vars["HTTP_X_THING"], "kept");
    assert_eq!(vars["REQUEST_URI"], "/x?y=1");
    assert!(!vars.contains_key("HTTP_PROXY"), "{vars:?}");
}

/// php-fpm's master, stopped with SIGTERM (which stops its pool too) however the test ends: SIGKILL
/// would leave the pool's processes behind.
struct Fpm(std::process::Child);

impl Drop for Fpm {
    fn drop(&mut self) {
        signal(self.0.id(), 15);
        if wait_timeout(&mut self.0, Duration::from_secs(5)).is_none() {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
}

fn php_fpm() -> &'static str {
    ["/usr/sbin/php-fpm8.2", "/usr/sbin/php-fpm"]
        .into_iter()
        .find(|p| Path::new(p).exists())
        .expect("php-fpm is not installed; run scripts/test, which installs what the tests need")
}

#[allow(
    clippy::too_many_lines,
    reason = "one comparison against real php-fpm, variable by variable"
)]
#[test]
fn params_parity_with_php_fpm() {
    require("php-cgi");
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let fpm_sock = sock(d, "fpm.sock");
    let ant_sock = sock(d, "ant.sock");
    std::fs::write(
        d.join("fpm.conf"),
        format!(
            "[global]\nerror_log = {d}/fpm.log\ndaemonize = no\npid = {d}/fpm.pid\n[www]\nuser = root\ngroup = root\nlisten = {s}\npm = static\npm.max_children = 1\n",
            d = d.display(),
            s = fpm_sock.display()
        ),
    )
    .unwrap();
    let _fpm = Fpm(Command::new(php_fpm())
        .args(["-R", "-n", "-y"])
        .arg(d.join("fpm.conf"))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap());
    // The worker's environment is part of $_SERVER for php-cgi; keep it as bare as php-fpm's clear_env.
    let a = Anteroom::start_full(
        &[
            "--listen-fastcgi",
            &format!("unix:{}", ant_sock.display()),
            "--workers",
            "1",
            "--",
            "php-cgi",
            "-n",
        ],
        &[],
        None,
        true,
    );
    wait_until("php-fpm to listen", Duration::from_secs(10), || {
        fpm_sock.exists()
    });
    let script = root().join("tests/fixtures/server.php");
    let n = Nginx::start(&format!(
        "  location / {{\n include /etc/nginx/fastcgi_params;\n fastcgi_param SCRIPT_FILENAME {};\n\
         set $up unix:{};\n if ($http_x_backend = ant) {{ set $up unix:{}; }}\n fastcgi_pass $up;\n  }}",
        script.display(),
        fpm_sock.display(),
        ant_sock.display()
    ));
    let fetch = |backend: &str| -> BTreeMap<String, serde_json::Value> {
        let r = request(
            n.addr(),
            format!(
                "POST /some/path.php?a=1&b=%20 HTTP/1.1\r\nHost: parity.test\r\nX-Backend: {backend}\r\n\
                 User-Agent: parity\r\nCookie: c=1\r\nContent-Type: text/plain\r\nContent-Length: 3\r\n\
                 Connection: close\r\n\r\nabc"
            )
            .as_bytes(),
        )
        .unwrap();
        assert_eq!(
            r.status,
            200,
            "{}\n{}\n{}",
            r.text(),
            n.error_log(),
            a.log_text()
        );
        serde_json::from_slice(&r.body).unwrap()
    };
    let fpm_vars = fetch("fpm");
    let ant_vars = fetch("ant");

    // Allowed to differ: what names the process or the socket, the clock, and the header that chose the
    // backend. Everything else nginx sent must arrive the same, but for one difference on purpose: the
    // hop-by-hop headers nginx passes on as params (here `Connection: close`) reach no anteroom worker. And
    // one addition: anteroom tells its workers when it received the request (`X-Request-Start`).
    let start = ant_vars
        .get("HTTP_X_REQUEST_START")
        .and_then(|v| v.as_str());
    assert!(start.is_some_and(|t| t.starts_with("t=")), "{ant_vars:?}");
    assert!(!fpm_vars.contains_key("HTTP_X_REQUEST_START"));
    assert_eq!(
        fpm_vars.get("HTTP_CONNECTION").and_then(|v| v.as_str()),
        Some("close")
    );
    assert!(!ant_vars.contains_key("HTTP_CONNECTION"), "{ant_vars:?}");
    let allowed = [
        "HTTP_CONNECTION",
        "HTTP_X_REQUEST_START",
        "HTTP_X_BACKEND",
        "REMOTE_PORT",
        "REQUEST_TIME",
        "REQUEST_TIME_FLOAT",
        "USER",
        "HOME",
        "PATH",
        "PWD",
        "SHLVL",
        "_",
        "ANTEROOM_LOG",
    ];
    let mut diffs = Vec::new();
    for k in fpm_vars.keys().chain(ant_vars.keys()) {
        if allowed.contains(&k.as_str()) || diffs.iter().any(|(d, _, _)| d == k) {
            continue;
        }
        if fpm_vars.get(k) != ant_vars.get(k) {
            diffs.push((
                k.clone(),
                fpm_vars.get(k).cloned(),
                ant_vars.get(k).cloned(),
            ));
        }
    }
    assert!(fpm_vars.contains_key("SCRIPT_FILENAME") && fpm_vars.contains_key("HTTP_COOKIE"));
    assert!(
        diffs.is_empty(),
        "params differ (key, php-fpm, anteroom):\n{diffs:#?}"
    );
}

fn open_fds(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap()
        .count()
}

fn metric(text: &str, name: &str) -> f64 {
    common::metric(text, name).unwrap_or(f64::NAN)
}

#[allow(
    clippy::too_many_lines,
    reason = "one end-to-end scenario of record exchanges, read top to bottom"
)]
#[test]
fn multiplexed_requests_with_aborts_and_hangups_leak_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let fsock = sock(dir.path(), "a.sock");
    let admin_port = free_port();
    let admin = format!("127.0.0.1:{admin_port}");
    let a = anteroom_fcgi(&fsock, &["--workers", "3", "--admin", &admin]);
    let pid = a.pid();
    let admin_addr: std::net::SocketAddr = admin.parse().unwrap();
    // Settle: every worker up and connected (three slow requests at once), then count.
    let addr = a.addr;
    let warm: Vec<_> = (0..3)
        .map(|_| std::thread::spawn(move || get(addr, "/sleep?ms=300")))
        .collect();
    for t in warm {
        assert_eq!(t.join().unwrap().status, 200);
    }
    let fds_before = open_fds(pid);
    let tasks_before = metric(
        &get(admin_addr, "/metrics").text(),
        "anteroom_runtime_tasks",
    );
    assert!(tasks_before > 0.0, "no anteroom_runtime_tasks in /metrics");

    const CONNS: usize = 4;
    const BATCH: u16 = 150; // under the per-connection bound of requests in flight
    const BATCHES: u16 = 4;
    let mut threads = Vec::new();
    for c in 0..CONNS {
        let fsock = fsock.clone();
        threads.push(std::thread::spawn(move || {
            let mut s = UnixStream::connect(&fsock).unwrap();
            s.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
            let mut rng = fastrand::Rng::with_seed(c as u64);
            let (mut ok, mut aborted_total, mut other) = (0u32, 0u32, 0u32);
            let mut buf = BytesMut::new();
            let mut chunk = [0u8; 65536];
            for batch in 0..BATCHES {
                let mut out = BytesMut::new();
                let mut aborted = std::collections::HashSet::new();
                for id in 1..=BATCH {
                    fcgi_request(
                        id,
                        "GET",
                        &format!("/sleep?ms={}", rng.u32(0..3)),
                        &[],
                        b"",
                        &mut out,
                    );
                    // A fifth of them are aborted right after they were sent.
                    if rng.u8(0..5) == 0 {
                        fcgi::encode_record(fcgi::ABORT_REQUEST, id, &[], &mut out);
                        aborted.insert(id);
                    }
                }
                s.write_all(&out).unwrap();
                if c == CONNS - 1 && batch == 1 {
                    // The last connection hangs up with a whole batch in flight.
                    return (0, 0, 0);
                }
                aborted_total += aborted.len() as u32;
                let mut ended = 0;
                let mut stdout: std::collections::HashMap<u16, Vec<u8>> = Default::default();
                while ended < BATCH {
                    match fcgi::decode_record(&mut buf).unwrap() {
                        Some(r) if r.kind == fcgi::STDOUT => stdout
                            .entry(r.request_id)
                            .or_default()
                            .extend_from_slice(&r.content),
                        Some(r) if r.kind == fcgi::END_REQUEST => {
                            let end = EndRequest::parse(&r.content).unwrap();
                            assert_eq!(end.protocol_status, fcgi::REQUEST_COMPLETE);
                            ended += 1;
                            let text = String::from_utf8_lossy(
                                stdout.get(&r.request_id).map_or(&[][..], |v| v),
                            );
                            if text.starts_with("Status: 200") {
                                ok += 1;
                            } else if !aborted.contains(&r.request_id) {
                                other += 1;
                            }
                        }
                        Some(_) => {}
                        None => {
                            let n = read_some(&mut s, &mut chunk).unwrap();
                            assert!(n > 0, "connection closed with {ended} of {BATCH} ended");
                            buf.extend_from_slice(&chunk[..n]);
                        }
                    }
                }
            }
            (ok, aborted_total, other)
        }));
    }
    let mut served = 0;
    let mut aborted = 0;
    for t in threads {
        let (ok, ab, other) = t.join().unwrap();
        assert_eq!(
            other, 0,
            "a request that was not aborted got something other than 200"
        );
        served += ok;
        aborted += ab;
    }
    // Every request not aborted got its 200 (an aborted one may have been answered before the abort).
    let expected = (CONNS as u32 - 1) * (BATCH * BATCHES) as u32 - aborted;
    assert!(
        served >= expected,
        "served {served}, expected at least {expected}"
    );

    wait_until(
        "connections, queue and tasks back to the baseline",
        Duration::from_secs(20),
        || {
            let m = get(admin_addr, "/metrics").text();
            metric(&m, "anteroom_client_connections") == 0.0
                && metric(&m, "anteroom_queue_depth") == 0.0
                && metric(&m, "anteroom_runtime_tasks") <= tasks_before
        },
    );
    let fd_list = |pid: u32| -> Vec<String> {
        let mut v: Vec<String> = std::fs::read_dir(format!("/proc/{pid}/fd"))
            .unwrap()
            .flatten()
            .filter_map(|e| std::fs::read_link(e.path()).ok())
            .map(|p| p.display().to_string())
            .collect();
        v.sort();
        v
    };
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while open_fds(pid) > fds_before {
        assert!(
            std::time::Instant::now() < deadline,
            "open fds {} > baseline {fds_before}: {:?}",
            open_fds(pid),
            fd_list(pid)
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    // Every worker is in rotation: three slow requests at once are served at once by three workers.
    let addr = a.addr;
    let slow: Vec<_> = (0..3)
        .map(|_| std::thread::spawn(move || get(addr, "/sleep?ms=300")))
        .collect();
    let pids: std::collections::HashSet<String> = slow
        .into_iter()
        .map(|t| {
            t.join()
                .unwrap()
                .text()
                .rsplit(' ')
                .next()
                .unwrap()
                .trim()
                .to_string()
        })
        .collect();
    assert_eq!(pids.len(), 3, "{pids:?}");
    assert!(!a.log_text().contains("ERROR"), "{}", a.log_text());
}

#[test]
fn malformed_input_closes_only_that_connection() {
    let dir = tempfile::tempdir().unwrap();
    let fsock = sock(dir.path(), "a.sock");
    let a = anteroom_fcgi(&fsock, &["--workers", "1"]);
    // A good connection, opened first, stays usable throughout.
    let mut good = UnixStream::connect(&fsock).unwrap();
    good.set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let bad_inputs: Vec<Vec<u8>> = vec![
        b"GET / HTTP/1.1\r\n\r\n".to_vec(), // not FastCGI: version 71
        {
            // PARAMS whose pair lengths overrun their record
            let mut out = BytesMut::new();
            BeginRequest {
                role: fcgi::RESPONDER,
                flags: 0,
            }
            .encode(1, &mut out);
            fcgi::encode_record(fcgi::PARAMS, 1, &[0x05, 0x7f, b'a'], &mut out);
            fcgi::encode_stream_end(fcgi::PARAMS, 1, &mut out);
            fcgi::encode_stream_end(fcgi::STDIN, 1, &mut out);
            out.to_vec()
        },
        {
            // a request id reused while in flight
            let mut out = BytesMut::new();
            BeginRequest {
                role: fcgi::RESPONDER,
                flags: fcgi::KEEP_CONN,
            }
            .encode(7, &mut out);
            BeginRequest {
                role: fcgi::RESPONDER,
                flags: fcgi::KEEP_CONN,
            }
            .encode(7, &mut out);
            out.to_vec()
        },
        vec![1, fcgi::PARAMS, 0, 1, 0, 200, 0], // stops mid-record, then hangs up
    ];
    for bad in bad_inputs {
        let mut s = UnixStream::connect(&fsock).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        s.write_all(&bad).unwrap();
        s.shutdown(std::net::Shutdown::Write).unwrap();
        let mut rest = Vec::new();
        let _ = s.read_to_end(&mut rest);
    }
    let mut out = BytesMut::new();
    fcgi_request(1, "GET", "/env", &[], b"", &mut out);
    good.write_all(&out).unwrap();
    let mut got = Vec::new();
    let mut chunk = [0u8; 8192];
    while !got.windows(2).any(|w| w == [fcgi::END_REQUEST, 0]) || got.len() < 16 {
        let n = read_some(&mut good, &mut chunk).unwrap();
        assert!(n > 0);
        got.extend_from_slice(&chunk[..n]);
    }
    assert!(String::from_utf8_lossy(&got).contains("Status: 200"));
    let log = a.log_text();
    for why in ["version", "only 1 remain", "reused", "inside a record"] {
        assert!(log.contains(why), "no log line saying {why}:\n{log}");
    }
}

#[test]
fn management_records_and_refused_roles() {
    let dir = tempfile::tempdir().unwrap();
    let fsock = sock(dir.path(), "a.sock");
    let _a = anteroom_fcgi(&fsock, &["--workers", "1"]);
    let mut s = UnixStream::connect(&fsock).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let mut out = BytesMut::new();
    let mut pairs = Vec::new();
    for n in [
        "FCGI_MAX_CONNS",
        "FCGI_MAX_REQS",
        "FCGI_MPXS_CONNS",
        "UNKNOWN_VAR",
    ] {
        fcgi::encode_pair(n.as_bytes(), b"", &mut pairs).unwrap();
    }
    fcgi::encode_record(fcgi::GET_VALUES, 0, &pairs, &mut out);
    fcgi::encode_record(42, 0, &[], &mut out);
    BeginRequest {
        role: fcgi::AUTHORIZER,
        flags: fcgi::KEEP_CONN,
    }
    .encode(3, &mut out);
    s.write_all(&out).unwrap();
    let mut buf = BytesMut::new();
    let mut records = Vec::new();
    let mut chunk = [0u8; 4096];
    while records.len() < 3 {
        match fcgi::decode_record(&mut buf).unwrap() {
            Some(r) => records.push(r),
            None => {
                let n = read_some(&mut s, &mut chunk).unwrap();
                assert!(n > 0);
                buf.extend_from_slice(&chunk[..n]);
            }
        }
    }
    assert_eq!(records[0].kind, fcgi::GET_VALUES_RESULT);
    let values: BTreeMap<String, String> = fcgi::decode_pairs(&records[0].content)
        .unwrap()
        .into_iter()
        .map(|(k, v)| {
            (
                String::from_utf8_lossy(&k).into(),
                String::from_utf8_lossy(&v).into(),
            )
        })
        .collect();
    assert_eq!(values["FCGI_MPXS_CONNS"], "1");
    assert_eq!(values.len(), 3, "{values:?}");
    assert_eq!(records[1].kind, fcgi::UNKNOWN_TYPE);
    assert_eq!(fcgi::parse_unknown_type(&records[1].content).unwrap(), 42);
    assert_eq!(records[2].kind, fcgi::END_REQUEST);
    assert_eq!(
        EndRequest::parse(&records[2].content)
            .unwrap()
            .protocol_status,
        fcgi::UNKNOWN_ROLE
    );
}

#[test]
fn requests_beyond_the_per_connection_bound_are_overloaded() {
    let dir = tempfile::tempdir().unwrap();
    let fsock = sock(dir.path(), "a.sock");
    let _a = anteroom_fcgi(&fsock, &["--workers", "1"]);
    let mut s = UnixStream::connect(&fsock).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    let mut out = BytesMut::new();
    // Each request takes 10 ms at the one worker, so all 300 arrive long before 256 of them can finish: with
    // `ms=0` a quick machine finished them as fast as they came and never reached the bound.
    for id in 1..=300 {
        fcgi_request(id, "GET", "/sleep?ms=10", &[], b"", &mut out);
    }
    s.write_all(&out).unwrap();
    let (mut complete, mut overloaded) = (0, 0);
    let mut buf = BytesMut::new();
    let mut chunk = [0u8; 65536];
    while complete + overloaded < 300 {
        match fcgi::decode_record(&mut buf).unwrap() {
            Some(r) if r.kind == fcgi::END_REQUEST => {
                match EndRequest::parse(&r.content).unwrap().protocol_status {
                    fcgi::REQUEST_COMPLETE => complete += 1,
                    fcgi::OVERLOADED => overloaded += 1,
                    other => panic!("protocol status {other}"),
                }
            }
            Some(_) => {}
            None => {
                let n = read_some(&mut s, &mut chunk).unwrap();
                assert!(n > 0);
                buf.extend_from_slice(&chunk[..n]);
            }
        }
    }
    assert!(
        overloaded > 0 && complete >= 256,
        "complete {complete}, overloaded {overloaded}"
    );
}

/// An access line with what varies from request to request (time, id, sizes, timings) blanked out.
fn access_shape(line: &str) -> Vec<String> {
    let from = line.find(" - - [").expect("a combined-format line");
    let remote_at = line[..from].rfind(' ').map_or(0, |i| i + 1);
    let after_time = line[from..].find("] ").expect("a time") + from + 2;
    let mut shape = vec![line[remote_at..from].to_string(), "- - [time]".to_string()];
    let mut after_request_line = 0;
    for token in line[after_time..].split_whitespace() {
        after_request_line += usize::from(after_request_line > 0 || token.ends_with('"'));
        shape.push(match token.split_once('=') {
            Some((k @ ("id" | "queue_ms" | "worker_ms"), v)) => {
                let kind = if v.parse::<f64>().is_ok() { "N" } else { v };
                format!("{k}={}", if k == "id" { "ID" } else { kind })
            }
            // The size of the answer, which differs with its front's params.
            _ if after_request_line == 3 && token.parse::<u64>().is_ok() => "N".into(),
            _ => token.to_string(),
        });
    }
    shape
}

#[test]
fn access_log_covers_the_fastcgi_front_as_the_http_one() {
    require("cgi-fcgi");
    let dir = tempfile::tempdir().unwrap();
    let fsock = sock(dir.path(), "a.sock");
    let mut a = anteroom_fcgi(&fsock, &["--workers", "1", "--access-log"]);
    let out = Command::new("cgi-fcgi")
        .args(["-bind", "-connect", fsock.to_str().unwrap()])
        .env_clear()
        .env("REQUEST_METHOD", "GET")
        .env("REQUEST_URI", "/env?x=1")
        .env("QUERY_STRING", "x=1")
        .env("PATH_INFO", "/env")
        .env("SERVER_PROTOCOL", "HTTP/1.1")
        .env("REMOTE_ADDR", "127.0.0.1")
        .env("REMOTE_PORT", "40000")
        .env("HTTP_USER_AGENT", "log-test")
        .env("HTTP_X_REQUEST_ID", "fcgi-log-1")
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.starts_with("Status: 200"), "{text}");
    assert!(
        text.to_ascii_lowercase()
            .contains("x-request-id: fcgi-log-1"),
        "the answer names its request id: {text}"
    );
    let r = a.raw(
        b"GET /env?x=1 HTTP/1.1\r\nHost: t\r\nUser-Agent: log-test\r\nX-Request-Id: http-log-1\r\nConnection: close\r\n\r\n",
    );
    assert_eq!(r.status, 200);
    a.stop();
    let log = a.log_text();
    let lines = |id: &str| -> Vec<String> {
        log.lines()
            .filter(|l| l.contains(&format!("id={id} ")))
            .map(str::to_string)
            .collect()
    };
    let (fcgi_lines, http_lines) = (lines("fcgi-log-1"), lines("http-log-1"));
    assert_eq!(fcgi_lines.len(), 1, "one access line per request:\n{log}");
    assert_eq!(http_lines.len(), 1, "{log}");
    let line = &fcgi_lines[0];
    assert!(line.contains(r#""GET /env?x=1 HTTP/1.1" 200 "#), "{line}");
    assert!(
        line.contains("queue_ms=") && line.contains("worker_ms=") && !line.contains("_ms=-"),
        "{line}"
    );
    assert_eq!(
        access_shape(line),
        access_shape(&http_lines[0]),
        "the same format on both fronts:\n{line}\n{}",
        http_lines[0]
    );
}
