//! The access log (and the request's accounting) say what the client got, as nginx's `$status`,
//! `$body_bytes_sent` and `$request_completion` do: a response cut short after its head went (the worker
//! died mid-body, the client stopped reading or hung up) is logged with the bytes that really went and an
//! `end=` reason, on both fronts; a streamed response with its real size. The worker is a raw-socket HTTP
//! app (tests/fixtures/dying_http_worker.py) that dies in the middle of a body.

mod common;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::Duration;

use bytes::BytesMut;
use common::*;

/// anteroom with the dying worker and the access log, `extra` options, and its admin listener.
fn dying_worker(extra: &[&str]) -> (Anteroom, SocketAddr) {
    let admin = format!("127.0.0.1:{}", free_port());
    let mut args = vec![
        "--access-log",
        "--workers",
        "1",
        "--worker-protocol",
        "http",
        "--admin",
        admin.as_str(),
    ];
    args.extend_from_slice(extra);
    args.extend(["--", "python3", "tests/fixtures/dying_http_worker.py"]);
    let a = Anteroom::start_env(&args, &[], Some("/ready"));
    (a, admin.parse().unwrap())
}

/// The access line of request `id`, once it is written; fails if there is more than one.
fn access_line(a: &Anteroom, id: &str) -> String {
    let needle = format!("id={id} ");
    wait_until(
        &format!("the access line of {id}"),
        Duration::from_secs(20),
        || a.log_text().lines().any(|l| l.contains(&needle)),
    );
    let log = a.log_text();
    let lines: Vec<&str> = log.lines().filter(|l| l.contains(&needle)).collect();
    assert_eq!(lines.len(), 1, "one access line for {id}:\n{log}");
    lines[0].to_string()
}

/// The status and size an access line gives, and its `end=` reason if any.
fn status_bytes_end(line: &str) -> (u16, u64, Option<String>) {
    let after = &line[line.find("HTTP/1.1\" ").expect("a request line") + 10..];
    let mut fields = after.split_whitespace();
    let status = fields.next().unwrap().parse().unwrap();
    let bytes = fields
        .next()
        .unwrap()
        .parse()
        .unwrap_or_else(|_| panic!("bytes are a number: {line}"));
    let end = line
        .split_whitespace()
        .find_map(|t| t.strip_prefix("end="))
        .map(str::to_string);
    (status, bytes, end)
}

/// The head and body bytes of what a client read until the end of the connection.
fn head_and_body(all: &[u8]) -> (String, usize) {
    let (head, body) = split_head(all);
    (head, body.len())
}

fn send_get(a: &Anteroom, path: &str, id: &str) -> TcpStream {
    let mut s = TcpStream::connect(a.addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: t\r\nX-Request-Id: {id}\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    s
}

fn read_all(s: &mut TcpStream) -> Vec<u8> {
    let mut all = Vec::new();
    // A reset after an aborted response is an ending too.
    let _ = s.read_to_end(&mut all);
    all
}

fn incomplete(admin: SocketAddr, reason: &str) -> f64 {
    let text = get(admin, "/metrics").text();
    metric(
        &text,
        &format!("anteroom_responses_incomplete_total{{reason=\"{reason}\"}}"),
    )
    .unwrap_or(0.0)
}

#[test]
fn a_worker_that_dies_mid_body_is_logged_with_the_bytes_sent_and_aborted() {
    let (a, admin) = dying_worker(&[]);
    let mut s = send_get(&a, "/die", "die-1");
    let all = read_all(&mut s);
    let (head, body) = head_and_body(&all);
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    assert!(
        head.to_ascii_lowercase()
            .contains("content-length: 1000000"),
        "{head}"
    );
    assert_eq!(body, 300_000, "the worker sent 300 kB before it died");
    let line = access_line(&a, "die-1");
    let (status, bytes, end) = status_bytes_end(&line);
    assert_eq!(status, 200, "the status the client got: {line}");
    assert_eq!(bytes, body as u64, "the body bytes the client got: {line}");
    assert_eq!(end.as_deref(), Some("aborted_upstream"), "{line}");
    assert_eq!(incomplete(admin, "aborted_upstream"), 1.0);
    // The worker comes back; a whole response has no end= and its own size.
    wait_until("the worker back", Duration::from_secs(20), || {
        a.try_get("/ready").is_ok_and(|r| r.status == 200)
    });
    let mut s = send_get(&a, "/big?n=123456", "whole-1");
    let (_, body) = head_and_body(&read_all(&mut s));
    assert_eq!(body, 123_456);
    let line = access_line(&a, "whole-1");
    assert_eq!(status_bytes_end(&line), (200, 123_456, None), "{line}");
    assert_eq!(incomplete(admin, "aborted_upstream"), 1.0);
}

#[test]
fn a_client_that_reads_nothing_is_logged_at_the_send_timeout_with_what_it_took() {
    const SIZE: u64 = 48 << 20;
    let (a, admin) = dying_worker(&["--send-timeout", "1"]);
    let path = format!("/big?n={SIZE}");
    let mut s = send_get(&a, &path, "stalled-1");
    // Nothing is read until anteroom has given up on this client.
    let line = access_line(&a, "stalled-1");
    let (status, bytes, end) = status_bytes_end(&line);
    assert_eq!(status, 200, "{line}");
    assert_eq!(end.as_deref(), Some("send_timeout"), "{line}");
    assert!(bytes < SIZE, "{line}");
    // What the kernel took is what the client can still read: exactly the bytes logged.
    let (head, body) = head_and_body(&read_all(&mut s));
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    assert_eq!(bytes, body as u64, "logged {line}");
    assert_eq!(incomplete(admin, "send_timeout"), 1.0);

    // A client that hangs up mid-body: the bytes it was sent, and client_gone.
    let mut s = send_get(&a, &path, "gone-1");
    let mut taken = vec![0u8; 256 << 10];
    s.read_exact(&mut taken).unwrap();
    drop(s);
    let line = access_line(&a, "gone-1");
    let (status, bytes, end) = status_bytes_end(&line);
    assert_eq!(status, 200, "{line}");
    assert_eq!(end.as_deref(), Some("client_gone"), "{line}");
    assert!(bytes > 0 && bytes < SIZE, "{line}");
    assert_eq!(incomplete(admin, "client_gone"), 1.0);
}

#[test]
fn streamed_and_bodiless_responses_log_the_bytes_sent() {
    let (a, admin) = dying_worker(&[]);
    // Chunked from the worker, chunked to the client: its real size, not "-".
    let r = a.raw(
        b"GET /chunked HTTP/1.1\r\nHost: t\r\nX-Request-Id: chunked-1\r\nConnection: close\r\n\r\n",
    );
    assert_eq!(r.status, 200);
    assert_eq!(
        r.header("transfer-encoding").as_deref(),
        Some("chunked"),
        "{}",
        r.head
    );
    assert_eq!(r.body.len(), 1_000_000);
    let line = access_line(&a, "chunked-1");
    assert_eq!(status_bytes_end(&line), (200, 1_000_000, None), "{line}");
    // HEAD: a Content-Length, no body; nothing was cut short.
    let r = a.raw(b"HEAD /big?n=5000 HTTP/1.1\r\nHost: t\r\nX-Request-Id: head-1\r\nConnection: close\r\n\r\n");
    assert_eq!(r.status, 200);
    let line = access_line(&a, "head-1");
    assert_eq!(status_bytes_end(&line), (200, 0, None), "{line}");
    // Refused by anteroom (a bad Host): its own body, logged once.
    let r = a.raw(b"GET /x HTTP/1.1\r\nHost: a b\r\nX-Request-Id: bad-1\r\n\r\n");
    assert_eq!(r.status, 400);
    let line = access_line(&a, "bad-1");
    assert_eq!(
        status_bytes_end(&line),
        (400, r.body.len() as u64, None),
        "{line}"
    );
    for reason in ["aborted_upstream", "client_gone", "send_timeout"] {
        assert_eq!(incomplete(admin, reason), 0.0, "{reason}");
    }
}

#[test]
fn the_fastcgi_front_logs_a_body_cut_short_by_the_worker() {
    let dir = tempfile::tempdir().unwrap();
    let fsock = dir.path().join("f.sock");
    let listen = format!("unix:{}", fsock.display());
    let (a, admin) = dying_worker(&["--listen-fastcgi", &listen]);
    let mut s = UnixStream::connect(Path::new(&fsock)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    let mut out = BytesMut::new();
    fcgi_request(
        1,
        "GET",
        "/die",
        &[("HTTP_X_REQUEST_ID", "fcgi-die-1")],
        b"",
        &mut out,
    );
    s.write_all(&out).unwrap();
    let (stdout, stderr) = fcgi_answer(&mut s, 1);
    let (head, body) = head_and_body(&stdout);
    assert!(head.starts_with("Status: 200"), "{head}");
    assert_eq!(body, 300_000);
    assert!(stderr.contains("anteroom:"), "{stderr}");
    let line = access_line(&a, "fcgi-die-1");
    let (status, bytes, end) = status_bytes_end(&line);
    assert_eq!(status, 200, "{line}");
    assert_eq!(bytes, 300_000, "{line}");
    assert_eq!(end.as_deref(), Some("aborted_upstream"), "{line}");
    assert_eq!(incomplete(admin, "aborted_upstream"), 1.0);
    // A whole one, on the same connection once the worker is back: its size, no end=.
    wait_until("the worker back", Duration::from_secs(20), || {
        a.try_get("/ready").is_ok_and(|r| r.status == 200)
    });
    let mut out = BytesMut::new();
    fcgi_request(
        2,
        "GET",
        "/big?n=70000",
        &[("HTTP_X_REQUEST_ID", "fcgi-whole-1")],
        b"",
        &mut out,
    );
    s.write_all(&out).unwrap();
    let (stdout, _) = fcgi_answer(&mut s, 2);
    assert_eq!(head_and_body(&stdout).1, 70_000);
    let line = access_line(&a, "fcgi-whole-1");
    assert_eq!(status_bytes_end(&line), (200, 70_000, None), "{line}");
}
