//! The real binary with real workers in each language: what a user sees over HTTP.

mod common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::process::Command;
use std::thread;
use std::time::{Duration, Instant};

use common::*;

#[test]
fn demo_app_serves_its_page_with_a_request_id() {
    let a = Anteroom::start(&["--workers", "2"]);
    let r = a.get("/");
    assert_eq!(r.status, 200);
    assert!(r.text().contains("anteroom is running"), "{}", r.text());
    assert_eq!(r.header("x-request-id").map(|v| v.len()), Some(16));
    // A sane id from the client is kept, so requests can be followed across hosts.
    let r = a
        .raw(b"GET /env HTTP/1.1\r\nHost: t\r\nX-Request-Id: abc-123\r\nConnection: close\r\n\r\n");
    assert_eq!(r.header("x-request-id").as_deref(), Some("abc-123"));
    assert!(
        r.text().contains("HTTP_X_REQUEST_ID=abc-123"),
        "{}",
        r.text()
    );
    assert_eq!(a.get("/nope").status, 404);
}

#[test]
fn php_cgi_serves_get_and_post() {
    require("php-cgi");
    let script = root().join("examples/php/index.php");
    let param = format!("SCRIPT_FILENAME={}", script.display());
    let a = Anteroom::start(&["--workers", "2", "--param", &param, "--", "php-cgi"]);
    let r = a.get("/hello?x=1");
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.header("x-worker-language").as_deref(), Some("php"));
    assert!(r.text().contains("GET /hello?x=1"), "{}", r.text());
    let body = "name=value&more=yes";
    let r = a.raw(
        format!(
            "POST /form HTTP/1.1\r\nHost: t\r\nContent-Type: application/x-www-form-urlencoded\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
            body.len()
        )
        .as_bytes(),
    );
    assert_eq!(r.status, 200);
    assert!(r.text().contains("POST /form"), "{}", r.text());
    assert!(
        r.text().contains("body: name=value&more=yes"),
        "{}",
        r.text()
    );
}

fn serves_language(args: &[&str], lang: &str, needle: &str) {
    let a = Anteroom::start(args);
    let r = a.get("/some/path?q=1");
    assert_eq!(r.status, 200, "{}\n{}", r.text(), a.log_text());
    assert_eq!(r.header("x-worker-language").as_deref(), Some(lang));
    assert!(r.text().contains(needle), "{}", r.text());
    assert!(r.text().contains("GET /some/path?q=1"), "{}", r.text());
    // A body reaches the app through the worker protocol.
    let r = a
        .raw(b"POST /p HTTP/1.1\r\nHost: t\r\nContent-Length: 5\r\nConnection: close\r\n\r\nhello");
    assert_eq!(r.status, 200, "{}", r.text());
    if lang != "perl-cgi-fast" {
        assert!(r.text().contains("body: hello"), "{}", r.text());
    }
}

#[test]
fn psgi_app_under_plack_fcgi() {
    require("plackup");
    serves_language(
        &[
            "--workers",
            "2",
            "--",
            "plackup",
            "-s",
            "FCGI",
            "--manager=",
            "examples/perl/app.psgi",
        ],
        "perl",
        "Hello from Perl",
    );
}

#[test]
fn cgi_fast_script() {
    require("perl");
    serves_language(
        &["--workers", "2", "--", "perl", "examples/perl/cgi_fast.pl"],
        "perl-cgi-fast",
        "Hello from CGI::Fast",
    );
}

#[test]
fn wsgi_app_under_flup() {
    require("python3");
    serves_language(
        &[
            "--workers",
            "2",
            "--",
            "python3",
            "examples/python/app_flup.py",
        ],
        "python",
        "Hello from Python",
    );
}

#[test]
fn gunicorn_as_http_worker() {
    require("gunicorn");
    serves_language(
        &[
            "--workers",
            "2",
            "--worker-protocol",
            "http",
            "--",
            "gunicorn",
            "-w",
            "1",
            "--chdir",
            "examples/python",
            "app_wsgi:app",
        ],
        "python",
        "Hello from Python",
    );
}

#[test]
fn limits_give_413_431_and_408() {
    let a = Anteroom::start(&[
        "--workers",
        "1",
        "--max-body-size",
        "1k",
        "--header-timeout",
        "1",
    ]);
    // Declared too large: refused before the body is read.
    let r = a.raw(b"POST / HTTP/1.1\r\nHost: t\r\nContent-Length: 5000\r\n\r\n");
    assert_eq!(r.status, 413);
    assert!(r.text().contains("request id"), "{}", r.text());
    // Chunked, so only counting tells.
    let mut req = b"POST / HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\n".to_vec();
    for _ in 0..3 {
        req.extend_from_slice(b"200\r\n");
        req.extend_from_slice(&[b'x'; 0x200]);
        req.extend_from_slice(b"\r\n");
    }
    req.extend_from_slice(b"0\r\n\r\n");
    assert_eq!(a.raw(&req).status, 413);
    // A chunked body under the limit is de-chunked and counted for the worker.
    let r = a.raw(b"POST /env HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n5\r\nhello\r\n3\r\n!!!\r\n0\r\n\r\n");
    assert_eq!(r.status, 200);
    assert!(r.text().contains("CONTENT_LENGTH=8"), "{}", r.text());
    assert!(r.text().contains("8 bytes of body"), "{}", r.text());

    let big = format!(
        "GET / HTTP/1.1\r\nHost: t\r\nX-Big: {}\r\n\r\n",
        "a".repeat(40_000)
    );
    assert_eq!(a.raw(big.as_bytes()).status, 431);

    let started = Instant::now();
    let r = a.raw(b"GET / HTTP/1.1\r\nHost: t\r\nX-Slow: ");
    assert_eq!(r.status, 408);
    assert!(started.elapsed() >= Duration::from_millis(900));

    // Silent connections (new, and kept alive after a request) are closed without an answer by the
    // table's sweep after --header-timeout.
    let silent = |mut s: TcpStream| {
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        let started = Instant::now();
        let mut rest = Vec::new();
        s.read_to_end(&mut rest).unwrap();
        assert!(rest.is_empty(), "{}", String::from_utf8_lossy(&rest));
        let waited = started.elapsed();
        assert!(
            waited >= Duration::from_millis(900),
            "closed after {waited:?}"
        );
        assert!(waited < Duration::from_secs(8), "closed after {waited:?}");
    };
    silent(TcpStream::connect(a.addr).unwrap());
    let mut kept = TcpStream::connect(a.addr).unwrap();
    kept.set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    kept.write_all(b"GET / HTTP/1.1\r\nHost: t\r\n\r\n")
        .unwrap();
    assert_eq!(read_response(&mut kept).unwrap().status, 200);
    silent(kept);

    // A kept-alive connection's next head has --header-timeout from its first byte, not from the end of
    // the last answer: begun after most of the idle limit and sent in two parts, it is served.
    let mut kept = TcpStream::connect(a.addr).unwrap();
    kept.set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    kept.write_all(b"GET / HTTP/1.1\r\nHost: t\r\n\r\n")
        .unwrap();
    assert_eq!(read_response(&mut kept).unwrap().status, 200);
    std::thread::sleep(Duration::from_millis(700));
    kept.write_all(b"GET / HTTP/1.1\r\n").unwrap();
    std::thread::sleep(Duration::from_millis(600));
    kept.write_all(b"Host: t\r\n\r\n").unwrap();
    assert_eq!(read_response(&mut kept).unwrap().status, 200);
}

#[test]
fn http10_keep_alive_and_pipelining() {
    let a = Anteroom::start(&["--workers", "1"]);
    let mut s = TcpStream::connect(a.addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    // nginx's default upstream protocol.
    s.write_all(b"GET /sleep?ms=1 HTTP/1.0\r\nConnection: keep-alive\r\n\r\n")
        .unwrap();
    let r = read_response(&mut s).unwrap();
    assert_eq!(r.status, 200);
    // Answered as HTTP/1.1, the highest version anteroom speaks (RFC 9110 §2.5, as nginx does), keeping
    // the connection as asked.
    assert!(r.head.starts_with("HTTP/1.1 200"), "{}", r.head);
    assert!(
        r.head
            .to_ascii_lowercase()
            .contains("connection: keep-alive"),
        "{}",
        r.head
    );
    // Two requests in one write: answered in order on the same connection.
    s.write_all(
        b"GET /sleep?ms=20 HTTP/1.1\r\nHost: t\r\n\r\nGET /env?second HTTP/1.1\r\nHost: t\r\n\r\n",
    )
    .unwrap();
    let r1 = read_response(&mut s).unwrap();
    let r2 = read_response(&mut s).unwrap();
    assert!(r1.text().contains("slept 20 ms"), "{}", r1.text());
    assert!(r2.text().contains("QUERY_STRING=second"), "{}", r2.text());
}

#[test]
fn full_queue_refuses_with_503_and_retry_after() {
    let a = Anteroom::start(&["--workers", "1", "--max-queue", "1"]);
    let addr = a.addr;
    // One request at the worker, one in the queue; the third finds the queue full.
    let busy: Vec<_> = (0..2)
        .map(|i| {
            thread::sleep(Duration::from_millis(if i == 0 { 0 } else { 200 }));
            thread::spawn(move || get(addr, "/sleep?ms=1500"))
        })
        .collect();
    thread::sleep(Duration::from_millis(400));
    let started = Instant::now();
    let r = a.get("/sleep?ms=1");
    assert_eq!(r.status, 503, "{}", r.text());
    assert!(
        started.elapsed() < Duration::from_secs(1),
        "refused at once, not after waiting"
    );
    let retry: u64 = r
        .header("retry-after")
        .expect("Retry-After")
        .parse()
        .unwrap();
    assert!((1..=60).contains(&retry));
    assert!(r.text().contains("queue is full"), "{}", r.text());
    for t in busy {
        assert_eq!(
            t.join().unwrap().status,
            200,
            "the queued ones are still served"
        );
    }
}

#[test]
fn queue_timeout_refuses_with_503() {
    let a = Anteroom::start(&["--workers", "1", "--queue-timeout", "0.5"]);
    let addr = a.addr;
    let long = thread::spawn(move || get(addr, "/sleep?ms=2000"));
    thread::sleep(Duration::from_millis(300));
    let started = Instant::now();
    let r = a.get("/sleep?ms=1");
    let waited = started.elapsed();
    assert_eq!(r.status, 503, "{}", r.text());
    assert!(r.header("retry-after").is_some());
    assert!(
        waited >= Duration::from_millis(450),
        "waited only {waited:?}"
    );
    assert_eq!(long.join().unwrap().status, 200);
}

#[test]
fn a_client_that_leaves_the_queue_is_never_served() {
    require("php-cgi");
    let dir = tempfile::tempdir().unwrap();
    let hits = dir.path().join("hits.log");
    let param = format!(
        "SCRIPT_FILENAME={}",
        root().join("tests/fixtures/hits.php").display()
    );
    let env = format!("HIT_LOG={}", hits.display());
    let a = Anteroom::start(&[
        "--workers",
        "1",
        "--param",
        &param,
        "--env",
        &env,
        "--",
        "php-cgi",
    ]);
    let addr = a.addr;
    let first = thread::spawn(move || get(addr, "/first?ms=1000"));
    thread::sleep(Duration::from_millis(200));
    {
        let mut s = TcpStream::connect(addr).unwrap();
        s.write_all(b"GET /abandoned HTTP/1.1\r\nHost: t\r\n\r\n")
            .unwrap();
        thread::sleep(Duration::from_millis(200));
        // Hangs up while its request waits behind /first.
    }
    assert_eq!(first.join().unwrap().status, 200);
    assert_eq!(a.get("/last").status, 200);
    let seen = std::fs::read_to_string(&hits).unwrap();
    assert!(seen.contains("/first") && seen.contains("/last"), "{seen}");
    assert!(
        !seen.contains("/abandoned"),
        "a worker served a request nobody waited for:\n{seen}"
    );
}

#[test]
fn a_worker_answering_garbage_gets_the_client_a_502_naming_the_request() {
    require("python3");
    let mut a = Anteroom::start_env(
        &[
            "--workers",
            "1",
            "--",
            "python3",
            "tests/fixtures/garbage_worker.py",
        ],
        &[],
        None,
    );
    let r = a
        .raw(b"GET /x HTTP/1.1\r\nHost: t\r\nX-Request-Id: garbage-1\r\nConnection: close\r\n\r\n");
    assert_eq!(r.status, 502, "{}", r.text());
    assert!(r.text().contains("garbage-1"), "{}", r.text());
    a.stop();
    let log = a.log_text();
    let line = log
        .lines()
        .find(|l| l.contains("garbage-1") && l.contains("ERROR"))
        .unwrap_or_else(|| panic!("no error line for the request:\n{log}"));
    assert!(
        line.contains("FastCGI version"),
        "the line says what was wrong: {line}"
    );
}

#[test]
fn a_worker_that_dies_is_replaced() {
    let a = Anteroom::start(&["--workers", "1"]);
    let pid_of = |r: &Response| -> u32 {
        r.text()
            .split("worker ")
            .nth(1)
            .and_then(|s| s.trim().parse().ok())
            .unwrap()
    };
    let first = pid_of(&a.get("/sleep?ms=1"));
    signal(first, 9);
    wait_until("a new worker", Duration::from_secs(10), || {
        a.try_get("/sleep?ms=1")
            .map(|r| r.status == 200 && pid_of(&r) != first)
            .unwrap_or(false)
    });
    assert!(
        a.log_text().contains("signal 9 (SIGKILL)"),
        "{}",
        a.log_text()
    );
}

#[test]
fn sigterm_stops_anteroom_and_its_workers() {
    let mut a = Anteroom::start(&["--workers", "3"]);
    let workers = children(a.pid());
    assert_eq!(workers.len(), 3, "{workers:?}");
    // A request in flight when SIGTERM comes still gets its answer.
    let addr = a.addr;
    let inflight = thread::spawn(move || get(addr, "/sleep?ms=800"));
    thread::sleep(Duration::from_millis(200));
    let status = a.stop();
    assert!(status.success(), "{status:?}\n{}", a.log_text());
    assert_eq!(inflight.join().unwrap().status, 200);
    for w in workers {
        assert!(!alive(w), "worker {w} outlived anteroom");
    }
}

#[test]
fn workers_die_with_anteroom_even_when_it_is_killed() {
    let mut a = Anteroom::start(&["--workers", "2"]);
    let workers = children(a.pid());
    assert_eq!(workers.len(), 2);
    let mut child = a.child.take().unwrap();
    child.kill().unwrap();
    child.wait().unwrap();
    wait_until("workers to die", Duration::from_secs(5), || {
        workers.iter().all(|w| !alive(*w))
    });
}

#[test]
fn unix_listener_replaces_a_stale_socket_and_refuses_a_live_one() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("a.sock");
    drop(std::os::unix::net::UnixListener::bind(&path).unwrap());
    let listen = format!("unix:{}", path.display());
    let mut a = Anteroom::start(&["--workers", "1", "--listen", &listen]);
    let mut s = std::os::unix::net::UnixStream::connect(&path).unwrap();
    s.write_all(b"GET /env HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n")
        .unwrap();
    let r = read_response(&mut s).unwrap();
    assert_eq!(r.status, 200);
    assert!(r.text().contains("REMOTE_ADDR=127.0.0.1"), "{}", r.text());

    let out = Command::new(BIN)
        .args(["--listen", &listen, "--workers", "1"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("a live process is listening"), "{err}");
    a.stop();
    assert!(!path.exists(), "the socket file is removed on stop");
}

#[test]
fn bad_configuration_is_refused_with_its_name() {
    let run = |args: &[&str]| {
        let out = Command::new(BIN).args(args).output().unwrap();
        assert!(!out.status.success(), "{args:?} was accepted");
        String::from_utf8_lossy(&out.stderr).into_owned()
    };
    assert!(run(&["--workers", "lots"]).contains("--workers"));
    assert!(run(&["--workers", "0"]).contains("workers"));
    assert!(run(&["--listen", "nowhere"]).contains("--listen"));
    assert!(run(&["--worker-protocol", "smtp"]).contains("--worker-protocol"));
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("a.toml");
    std::fs::write(&file, "max-queue = 10\nmax-qeueu = 5\n").unwrap();
    let err = run(&["--config", file.to_str().unwrap()]);
    assert!(err.contains("max-qeueu"), "{err}");
}

/// Every option is also `ANTEROOM_<NAME>`: a flag wins over it, it wins over the file, and a bad value names
/// the variable.
#[test]
fn environment_variables_sit_between_flags_and_file() {
    let run = |args: &[&str], env: &[(&str, &str)]| {
        let out = Command::new(BIN)
            .args(args)
            .envs(env.iter().copied())
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr).into_owned();
        assert_eq!(out.status.code(), Some(2), "{args:?} {env:?}: {err}");
        err
    };
    let err = run(&[], &[("ANTEROOM_WORKERS", "lots")]);
    assert!(
        err.contains("ANTEROOM_WORKERS") && err.contains("lots"),
        "{err}"
    );
    let err = run(&[], &[("ANTEROOM_LOG_FORMAT", "xml")]);
    assert!(err.contains("ANTEROOM_LOG_FORMAT"), "{err}");
    let err = run(&[], &[("ANTEROOM_MAX_QUEUE", "0")]);
    assert!(err.contains("max-queue:"), "{err}");
    // The flag wins: the variable's bad value is never read, and the next check fails instead.
    let err = run(
        &["--workers", "2", "--temp-dir", "/nonexistent/anteroom"],
        &[("ANTEROOM_WORKERS", "lots")],
    );
    assert!(err.contains("temp-dir:"), "{err}");
    // Also under the serve subcommand (and a subcommand's top level does not read the variables at all:
    // workers inherit them).
    let err = run(
        &[
            "serve",
            "--workers",
            "2",
            "--temp-dir",
            "/nonexistent/anteroom",
        ],
        &[("ANTEROOM_WORKERS", "lots")],
    );
    assert!(err.contains("temp-dir:"), "{err}");
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("a.toml");
    std::fs::write(&file, "max-queue = 10\n").unwrap();
    let config = file.to_str().unwrap();
    // The variable wins over the file.
    let err = run(&["--config", config], &[("ANTEROOM_MAX_QUEUE", "0")]);
    assert!(err.contains("max-queue:"), "{err}");
    // The file is named by a variable too.
    std::fs::write(&file, "max-queue = 0\n").unwrap();
    let err = run(&[], &[("ANTEROOM_CONFIG", config)]);
    assert!(err.contains("max-queue:"), "{err}");
}

#[test]
fn access_log_in_json_and_logfmt() {
    let mut a = Anteroom::start(&["--workers", "1", "--access-log", "--log-format", "json"]);
    a.raw(b"GET /env?x=1 HTTP/1.1\r\nHost: t\r\nX-Request-Id: log-1\r\nConnection: close\r\n\r\n");
    a.stop();
    let log = a.log_text();
    for line in log.lines() {
        serde_json::from_str::<serde_json::Value>(line).unwrap_or_else(|e| panic!("{e}: {line}"));
    }
    let access = log
        .lines()
        .find(|l| l.contains("log-1"))
        .expect("an access line");
    assert!(
        access.contains(r#"\"GET /env?x=1 HTTP/1.1\" 200"#),
        "{access}"
    );
    assert!(
        access.contains("queue_ms=") && access.contains("worker_ms="),
        "{access}"
    );

    let mut a = Anteroom::start(&["--workers", "1", "--access-log", "--log-format", "logfmt"]);
    a.get("/env");
    a.stop();
    let log = a.log_text();
    assert!(log.lines().all(|l| l.starts_with("ts=")), "{log}");
    assert!(log.contains("target=access msg="), "{log}");
}

#[test]
fn sigint_stops_at_once_and_sigterm_twice_too() {
    for signals in [&[2][..], &[15, 15][..]] {
        let mut a = Anteroom::start(&["--workers", "1"]);
        let addr = a.addr;
        let held = thread::spawn(move || {
            request(
                addr,
                b"GET /sleep?ms=8000 HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n",
            )
        });
        thread::sleep(Duration::from_millis(300));
        let mut child = a.child.take().unwrap();
        let started = Instant::now();
        for sig in signals {
            signal(child.id(), *sig);
            thread::sleep(Duration::from_millis(100));
        }
        // A graceful stop would wait for the 8-second request; a fast one does not.
        let status = wait_timeout(&mut child, Duration::from_secs(20)).expect("anteroom exits");
        assert!(
            status.success(),
            "{signals:?}: {status:?}\n{}",
            a.log_text()
        );
        assert!(
            started.elapsed() < Duration::from_secs(6),
            "{signals:?} took {:?}",
            started.elapsed()
        );
        assert!(a.log_text().contains("stopping now"), "{}", a.log_text());
        let _ = held.join();
    }
}

#[test]
fn a_client_that_leaves_while_queued_or_at_a_worker_is_logged_once_as_499() {
    let mut a = Anteroom::start(&["--workers", "1", "--access-log"]);
    let addr = a.addr;
    // The one worker is busy with the first request while the second waits in the queue; the third is at
    // the worker when its client leaves.
    let busy = std::thread::spawn(move || {
        request(
            addr,
            b"GET /sleep?ms=1500 HTTP/1.1\r\nHost: t\r\nX-Request-Id: busy-1\r\nConnection: close\r\n\r\n",
        )
    });
    std::thread::sleep(Duration::from_millis(300));
    let mut queued = std::net::TcpStream::connect(addr).unwrap();
    queued
        .write_all(b"GET /env HTTP/1.1\r\nHost: t\r\nX-Request-Id: left-queued\r\n\r\n")
        .unwrap();
    std::thread::sleep(Duration::from_millis(300));
    drop(queued);
    assert_eq!(busy.join().unwrap().unwrap().status, 200);
    let mut at_worker = std::net::TcpStream::connect(addr).unwrap();
    at_worker
        .write_all(b"GET /sleep?ms=800 HTTP/1.1\r\nHost: t\r\nX-Request-Id: left-at-worker\r\n\r\n")
        .unwrap();
    std::thread::sleep(Duration::from_millis(300));
    drop(at_worker);
    std::thread::sleep(Duration::from_millis(900));
    assert_eq!(a.get("/env").status, 200, "still serving");
    a.stop();
    let log = a.log_text();
    for id in ["left-queued", "left-at-worker"] {
        let lines: Vec<&str> = log
            .lines()
            .filter(|l| l.contains(&format!("id={id} ")))
            .collect();
        assert_eq!(lines.len(), 1, "one access line for {id}:\n{log}");
        assert!(lines[0].contains("\" 499 "), "{}", lines[0]);
    }
}
