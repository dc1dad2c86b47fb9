//! anteroom's own client towards HTTP workers (`worker/http`, `http1::client`), against real workers: a
//! raw-socket worker app for the framings WSGI servers never produce (tests/fixtures/raw_http_worker.py:
//! lying lengths, Content-Length with Transfer-Encoding, other codings, bodies delimited by the close,
//! interim heads), gunicorn for the normal path and for kept-alive connections (`-k gthread`).

mod common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::Duration;

use common::*;

fn raw_worker() -> Anteroom {
    raw_worker_with(&[])
}

/// The raw worker app behind anteroom started with `extra` options too.
fn raw_worker_with(extra: &[&str]) -> Anteroom {
    let mut args = vec![
        "--access-log",
        "--workers",
        "1",
        "--worker-protocol",
        "http",
    ];
    args.extend_from_slice(extra);
    args.extend(["--", "python3", "tests/fixtures/raw_http_worker.py"]);
    Anteroom::start_env(&args, &[], Some("/ready"))
}

/// The byte pattern the worker app sends (byte i is i % 251).
fn pattern(n: usize) -> Vec<u8> {
    (0..n).map(|i| (i % 251) as u8).collect()
}

/// Everything the client gets for `method path` on a connection that closes after it.
fn everything(a: &Anteroom, method: &str, path: &str) -> Vec<u8> {
    let mut s = TcpStream::connect(a.addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    write!(
        s,
        "{method} {path} HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut all = Vec::new();
    // A reset after an aborted response is an ending too.
    let _ = s.read_to_end(&mut all);
    all
}

/// The status of the access-log line for `path`, once it is written.
fn logged_status(a: &Anteroom, path: &str) -> String {
    let needle = format!(" {path} HTTP/1.1\" ");
    let mut status = String::new();
    wait_until("the access-log line", Duration::from_secs(10), || {
        let log = a.log_text();
        match log.lines().find(|l| l.contains(&needle)) {
            Some(line) => {
                let after = &line[line.find(&needle).unwrap() + needle.len()..];
                status = after.split_whitespace().next().unwrap_or("").to_string();
                true
            }
            None => false,
        }
    });
    status
}

#[test]
fn a_lying_content_length_is_a_502_or_an_aborted_response() {
    let a = raw_worker();
    // Small: nothing went to the client yet, so it gets a 502 naming its request id, and the access log
    // says 502, not 200.
    let r = a.get("/short-small");
    assert_eq!(r.status, 502, "{}", r.text());
    let id = r.header("x-request-id").unwrap();
    assert!(r.text().contains(&id), "{}", r.text());
    assert_eq!(logged_status(&a, "/short-small"), "502");
    let log = a.log_text();
    assert!(
        log.contains("after 10 of the 100 bytes its Content-Length declared"),
        "{log}"
    );
    // Large: the head went to the client before the body was read; the client's response is cut short
    // (fewer bytes than declared, the connection closed), never completed, and the access log has the
    // status the client got.
    let all = everything(&a, "GET", "/short-large");
    let (head, body) = split_head(&all);
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    assert!(
        head.to_ascii_lowercase()
            .contains("content-length: 2000000"),
        "{head}"
    );
    assert!(body.len() < 2_000_000, "{} bytes", body.len());
    assert_eq!(body, &pattern(body.len())[..]);
    assert_eq!(logged_status(&a, "/short-large"), "200");
    wait_until("the abort's log line", Duration::from_secs(10), || {
        a.log_text()
            .contains("bytes short of its Content-Length: the client's response is aborted")
    });
    // The worker is still served by the same anteroom afterwards.
    assert_eq!(a.get("/").status, 200);
}

#[test]
fn ambiguous_framing_and_other_codings_are_502() {
    let a = raw_worker();
    for (path, why) in [
        ("/cl-te", "both Content-Length and Transfer-Encoding"),
        (
            "/gzip-te",
            "Transfer-Encoding \"gzip, chunked\" is not exactly chunked",
        ),
    ] {
        let r = a.get(path);
        assert_eq!(r.status, 502, "{path}: {}", r.text());
        let id = r.header("x-request-id").unwrap();
        assert!(r.text().contains(why), "{path}: {}", r.text());
        assert_eq!(logged_status(&a, path), "502");
        let log = a.log_text();
        assert!(
            log.lines()
                .any(|l| l.contains(&id) && l.contains(why) && l.contains("ERROR")),
            "{path}: no error line naming {id}:\n{log}"
        );
    }
}

#[test]
fn bodies_by_every_framing_arrive_whole() {
    let a = raw_worker();
    // Delimited by the close: relayed whole (small and streamed).
    for (path, n) in [("/close-small", 1000), ("/close-large", 1_000_000)] {
        let r = a.get(path);
        assert_eq!(r.status, 200, "{path}");
        assert_eq!(r.body.len(), n, "{path}");
        assert_eq!(r.body, pattern(n), "{path}");
    }
    // Chunked: a small one complete with its head goes out whole, with its length; a large one streams.
    let r = a.get("/chunked-small");
    assert_eq!(r.status, 200);
    assert_eq!(
        r.header("content-length").as_deref(),
        Some("3000"),
        "{}",
        r.head
    );
    assert_eq!(r.body, pattern(3000));
    let r = a.get("/chunked-large");
    assert_eq!(r.status, 200);
    assert_eq!(r.body, pattern(1_000_000));
    // Hop-by-hop headers stay on the worker's side.
    let r = a.get("/hop");
    assert_eq!(r.header("x-kept").as_deref(), Some("1"), "{}", r.head);
    for hop in ["keep-alive", "upgrade", "proxy-connection"] {
        assert!(r.header(hop).is_none(), "{hop}: {}", r.head);
    }
}

#[test]
fn a_chunked_body_cut_short_aborts_the_response() {
    let a = raw_worker();
    let all = everything(&a, "GET", "/chunked-cut");
    let (head, body) = split_head(&all);
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    assert!(
        head.to_ascii_lowercase()
            .contains("transfer-encoding: chunked"),
        "{head}"
    );
    assert!(!body.is_empty());
    assert!(!body.ends_with(b"0\r\n\r\n"), "the response was completed");
    wait_until("the abort's log line", Duration::from_secs(10), || {
        a.log_text()
            .contains("before its last chunk: the client's response is aborted")
    });
}

#[test]
fn interim_heads_head_204_and_304() {
    let a = raw_worker();
    let r = a.get("/continue");
    assert_eq!(r.status, 201, "{}", r.head);
    assert_eq!(r.text(), "done");
    // HEAD: the length a GET would get, no body (the next response on the connection is intact).
    let mut s = TcpStream::connect(a.addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    s.write_all(b"HEAD /head HTTP/1.1\r\nHost: t\r\n\r\nGET /204 HTTP/1.1\r\nHost: t\r\n\r\nGET /304 HTTP/1.1\r\nHost: t\r\n\r\nGET / HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n")
        .unwrap();
    let mut all = Vec::new();
    s.read_to_end(&mut all).unwrap();
    let text = String::from_utf8_lossy(&all);
    let heads: Vec<&str> = text.split("HTTP/1.1 ").skip(1).collect();
    assert_eq!(heads.len(), 4, "{text}");
    assert!(heads[0].starts_with("200"), "{text}");
    assert!(
        heads[0]
            .to_ascii_lowercase()
            .contains("content-length: 1234"),
        "{text}"
    );
    assert!(
        heads[0].ends_with("\r\n\r\n"),
        "a body followed HEAD: {text}"
    );
    assert!(
        heads[1].starts_with("204") && heads[1].contains("x-was: 204"),
        "{text}"
    );
    assert!(heads[1].ends_with("\r\n\r\n"), "{text}");
    assert!(
        heads[2].starts_with("304") && heads[2].contains("etag"),
        "{text}"
    );
    assert!(
        heads[3].starts_with("200") && heads[3].ends_with("ok\n"),
        "{text}"
    );
}

#[test]
fn a_worker_that_closes_before_answering_gets_a_get_again() {
    let a = raw_worker();
    // Closed with no answer: a GET goes again (the worker answers the second time), a POST gets a 502.
    let r = a.get("/close-once");
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.text(), "answered");
    let r = a.raw(
        b"POST /close-once HTTP/1.1\r\nHost: t\r\nContent-Length: 2\r\nConnection: close\r\n\r\nhi",
    );
    assert_eq!(r.status, 502, "{}", r.text());
    let log = a.get("/log").text();
    assert_eq!(
        log.lines().filter(|l| *l == "GET /close-once").count(),
        2,
        "{log}"
    );
    assert_eq!(
        log.lines().filter(|l| *l == "POST /close-once").count(),
        1,
        "{log}"
    );
}

/// gunicorn's threaded worker keeps connections alive: one connection carries the requests one after
/// another (the app reports which connection served it), and request bodies arrive intact.
#[test]
fn kept_alive_connections_to_gunicorn_gthread() {
    require("gunicorn");
    let a = Anteroom::start(&[
        "--workers",
        "1",
        "--worker-protocol",
        "http",
        "--",
        "gunicorn",
        "-k",
        "gthread",
        "--threads",
        "2",
        "--keep-alive",
        "30",
        "-w",
        "1",
        "--chdir",
        "tests/fixtures",
        "conn_wsgi:app",
    ]);
    let mut conns = std::collections::BTreeSet::new();
    for i in 0..30 {
        let body = "x".repeat(i * 1000);
        let req = format!(
            "POST /conn HTTP/1.1\r\nHost: t\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
            body.len()
        );
        let r = a.raw(req.as_bytes());
        assert_eq!(r.status, 200, "{}", r.text());
        let text = r.text();
        let (conn, len) = text.trim().split_once(' ').unwrap();
        assert_eq!(len, body.len().to_string(), "{text}");
        conns.insert(conn.to_string());
    }
    // The readiness probe and these 30 requests, on one connection (two if the worker's keep-alive timeout
    // crossed the run).
    assert!(conns.len() <= 2, "{conns:?}");
}

/// A worker that answers before it has read a large body, and whose answer is larger than the socket can
/// hold: anteroom stops sending the body once the answer's head is in and relays it (writing the whole
/// body first would wait for the worker, which waits for anteroom to read: until the request timeout).
#[test]
fn an_answer_before_the_body_is_read_is_relayed() {
    let a = raw_worker_with(&["--request-timeout", "20"]);
    let body = vec![b'x'; 4_000_000];
    let mut s = TcpStream::connect(a.addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(15))).unwrap();
    write!(
        s,
        "POST /early-large HTTP/1.1\r\nHost: t\r\nConnection: close\r\nContent-Length: {}\r\n\r\n",
        body.len()
    )
    .unwrap();
    s.write_all(&body).unwrap();
    let mut all = Vec::new();
    let _ = s.read_to_end(&mut all);
    let (head, got) = split_head(&all);
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    assert_eq!(got.len(), 2_000_000, "{head}");
    assert!(got == pattern(2_000_000).as_slice());
}
