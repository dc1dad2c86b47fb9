//! What an outside conformance run found in the hyper front (issue 12), as data: raw requests in, against the
//! real binary and a real worker of each protocol (`tests/fixtures/conform_worker.py`, which echoes what
//! reached it: the HTTP request head, or the FastCGI params); out, the status the client got and what the
//! worker saw.

mod common;

use std::time::Duration;

use common::*;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Protocol {
    Fastcgi,
    Http,
}

const BOTH: [Protocol; 2] = [Protocol::Fastcgi, Protocol::Http];

/// anteroom with one conform_worker of `protocol`, and the access log on.
fn start(protocol: Protocol) -> Anteroom {
    require("python3");
    let mut args = vec!["--workers", "1", "--access-log"];
    if protocol == Protocol::Http {
        args.extend(["--worker-protocol", "http"]);
    }
    args.extend(["--", "python3", "tests/fixtures/conform_worker.py"]);
    Anteroom::start(&args)
}

/// Every echo of the worker ends with this line; no answer of anteroom's own has it.
const ECHOED: &str = "body: ";

/// Requests that must be refused before any worker sees them: (what, raw request, status).
const REFUSED: &[(&str, &[u8], u16)] = &[
    (
        "HTTP/1.1 without Host",
        b"GET /r HTTP/1.1\r\nConnection: close\r\n\r\n",
        400,
    ),
    (
        "two Host headers",
        b"GET /r HTTP/1.1\r\nHost: localhost\r\nHost: evil.example.com\r\nConnection: close\r\n\r\n",
        400,
    ),
    (
        "Host with a space",
        b"GET /r HTTP/1.1\r\nHost: a.example b.example\r\nConnection: close\r\n\r\n",
        400,
    ),
    (
        "Host with a slash",
        b"GET /r HTTP/1.1\r\nHost: a.example/evil\r\nConnection: close\r\n\r\n",
        400,
    ),
    (
        "Host with user info",
        b"GET /r HTTP/1.1\r\nHost: user@a.example\r\nConnection: close\r\n\r\n",
        400,
    ),
    (
        "Host with a port that is no number",
        b"GET /r HTTP/1.1\r\nHost: a.example:http\r\nConnection: close\r\n\r\n",
        400,
    ),
    (
        "Host with a byte outside the URI grammar",
        b"GET /r HTTP/1.1\r\nHost: a.ex\"ample\r\nConnection: close\r\n\r\n",
        400,
    ),
    (
        "empty Host",
        b"GET /r HTTP/1.1\r\nHost: \r\nConnection: close\r\n\r\n",
        400,
    ),
    (
        "absolute-form target with user info",
        b"GET http://user@a.example/r HTTP/1.1\r\nHost: a.example\r\nConnection: close\r\n\r\n",
        400,
    ),
    (
        "CONNECT",
        b"CONNECT a.example:443 HTTP/1.1\r\nHost: a.example:443\r\nX-Request-Id: connect-1\r\n\r\n",
        405,
    ),
];

/// Fails with every case that went wrong, not only the first.
fn check(failures: &[String]) {
    assert!(
        failures.is_empty(),
        "{} failed:\n\n{}",
        failures.len(),
        failures.join("\n\n")
    );
}

#[test]
fn bad_hosts_and_connect_are_refused_before_any_worker() {
    let mut failures = Vec::new();
    for protocol in BOTH {
        let a = start(protocol);
        for (what, raw, status) in REFUSED {
            let r = match request(a.addr, raw) {
                Ok(r) => r,
                Err(e) => {
                    failures.push(format!("{protocol:?}, {what}: no answer: {e}"));
                    continue;
                }
            };
            let refused = r.status == *status
                && !r.text().contains(ECHOED)
                && r.text().contains("request id");
            if !refused {
                failures.push(format!(
                    "{protocol:?}, {what}: wanted {status} from anteroom, got:\n{}{}",
                    r.head,
                    r.text()
                ));
            }
        }
    }
    check(&failures);
    for protocol in BOTH {
        let a = start(protocol);
        // CONNECT: 405 with Allow (RFC 9110 15.5.6), and the access log says so, not 200.
        let (_, connect, _) = REFUSED.iter().find(|c| c.0 == "CONNECT").unwrap();
        let r = request(a.addr, connect).unwrap();
        let allow = r.header("allow").unwrap_or_default();
        assert!(
            allow.contains("GET") && !allow.contains("CONNECT"),
            "{}",
            r.head
        );
        wait_until("the access line of CONNECT", Duration::from_secs(3), || {
            a.log_text().lines().any(|l| {
                // The target is the authority a CONNECT names, not `/`.
                l.contains("id=connect-1 ") && l.contains("\"CONNECT a.example:443 HTTP/1.1\" 405 ")
            })
        });
    }
}

/// Requests that reach the worker: (what, raw request, what the FastCGI worker must see, what the HTTP
/// worker must see, what neither may see). Both echoes are compared in lower case.
type Seen = (
    &'static str,
    &'static [u8],
    &'static [&'static str],
    &'static [&'static str],
    &'static [&'static str],
);

const SEEN: &[Seen] = &[
    (
        "absolute-form target: its authority wins over Host",
        b"GET http://a.example/x?q=1 HTTP/1.1\r\nHost: b.example\r\nConnection: close\r\n\r\n",
        &["\nhttp_host=a.example\n", "\nserver_name=a.example\n", "\nrequest_uri=/x?q=1\n", "\npath_info=/x\n"],
        &["get /x?q=1 http/1.1\r\n", "\r\nhost: a.example\r\n"],
        &["b.example"],
    ),
    (
        "absolute-form target with a port",
        b"GET http://a.example:8080/x HTTP/1.1\r\nHost: b.example\r\nConnection: close\r\n\r\n",
        &["\nhttp_host=a.example:8080\n", "\nserver_name=a.example\n", "\nserver_port=8080\n"],
        &["get /x http/1.1\r\n", "\r\nhost: a.example:8080\r\n"],
        &["b.example"],
    ),
    (
        "hop-by-hop headers, and those Connection names, after de-chunking",
        b"POST /h HTTP/1.1\r\nHost: t\r\nConnection: keep-alive, X-Hop\r\nKeep-Alive: timeout=5\r\n\
          TE: trailers\r\nTrailer: X-T\r\nProxy-Connection: keep-alive\r\nX-Hop: 1\r\n\
          Transfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n",
        &["\ncontent_length=5\n", "body: 5 bytes"],
        &["\r\ncontent-length: 5\r\n", "body: 5 bytes"],
        &["transfer", "chunked", "connection", "keep-alive", "keep_alive", "te=", "te:", "trailer", "x-hop", "x_hop"],
    ),
    (
        "Upgrade",
        b"GET /u HTTP/1.1\r\nHost: t\r\nUpgrade: h2c\r\nConnection: close\r\n\r\n",
        &["\nrequest_uri=/u\n"],
        &["get /u http/1.1\r\n"],
        &["upgrade", "h2c"],
    ),
    (
        "header names with an underscore, for either protocol",
        b"GET /n HTTP/1.1\r\nHost: t\r\nX-Forwarded_For: 6.6.6.6\r\nX_Custom: 1\r\nConnection: close\r\n\r\n",
        &["\nrequest_uri=/n\n"],
        &["get /n http/1.1\r\n"],
        &["6.6.6.6", "x_custom", "forwarded_for"],
    ),
    (
        "HTTP/1.0 without Host is still served",
        b"GET /old HTTP/1.0\r\n\r\n",
        &["\nserver_protocol=http/1.0\n", "\nrequest_uri=/old\n"],
        &["get /old http/1.1\r\n"],
        &[],
    ),
];

#[test]
fn the_worker_sees_one_host_and_no_hop_by_hop_headers() {
    let mut failures = Vec::new();
    for protocol in BOTH {
        let a = start(protocol);
        for (what, raw, fastcgi, http, never) in SEEN {
            let r = match request(a.addr, raw) {
                Ok(r) => r,
                Err(e) => {
                    failures.push(format!("{protocol:?}, {what}: no answer: {e}"));
                    continue;
                }
            };
            // A newline first, so that the first variable is matched as `\nNAME=` like the others.
            let seen = format!("\n{}", r.text().to_ascii_lowercase());
            let wanted = if protocol == Protocol::Fastcgi {
                fastcgi
            } else {
                http
            };
            let mut wrong: Vec<String> = wanted
                .iter()
                .filter(|w| !seen.contains(*w))
                .map(|w| format!("{w:?} missing"))
                .collect();
            wrong.extend(
                never
                    .iter()
                    .filter(|n| seen.contains(*n))
                    .map(|n| format!("{n:?} reached the worker")),
            );
            if r.status != 200 || !seen.contains(ECHOED) {
                wrong.push(format!("no echo ({})", r.status));
            }
            if !wrong.is_empty() {
                failures.push(format!(
                    "{protocol:?}, {what}: {}; saw:{seen}",
                    wrong.join(", ")
                ));
            }
        }
    }
    check(&failures);
}

#[test]
fn a_response_with_content_length_and_transfer_encoding_is_a_502() {
    let mut failures = Vec::new();
    for protocol in BOTH {
        let a = start(protocol);
        let id = format!("clte-{protocol:?}");
        let raw = format!(
            "GET /clte HTTP/1.1\r\nHost: t\r\nX-Request-Id: {id}\r\nConnection: close\r\n\r\n"
        );
        let r = match request(a.addr, raw.as_bytes()) {
            Ok(r) => r,
            Err(e) => {
                failures.push(format!("{protocol:?}: no answer: {e}\n{}", a.log_text()));
                continue;
            }
        };
        let named = r.text().contains(&format!("request id: {id}"))
            && r.header("x-request-id").as_deref() == Some(id.as_str());
        if r.status != 502 || !named {
            failures.push(format!(
                "{protocol:?}: wanted a 502 naming {id}, got:\n{}{}",
                r.head,
                r.text()
            ));
            continue;
        }
        // The line that says what was wrong (at ERROR, as for every wrong answer from a worker), and the
        // access line with what the client got.
        let logged = |log: &str| {
            log.lines().any(|l| {
                l.contains(&id)
                    && l.contains(" ERROR ")
                    && l.contains("both Content-Length and Transfer-Encoding")
            }) && log
                .lines()
                .any(|l| l.contains(&format!("id={id} ")) && l.contains("\" 502 "))
        };
        wait_until("the log lines of the 502", Duration::from_secs(3), || {
            logged(&a.log_text())
        });
        // The worker stays, and the next request is served.
        let r = a.get("/after");
        assert_eq!(r.status, 200, "{protocol:?}: {}", r.text());
    }
    check(&failures);
}

/// The FastCGI front (nginx's `fastcgi_pass`) applies the rules that make sense behind an HTTP server: a
/// `HTTP_HOST` must be valid and single when given, and may be missing (nginx passes HTTP/1.0 requests
/// without one); the hop-by-hop headers nginx passes on as params (`HTTP_TRANSFER_ENCODING=chunked` next
/// to the `CONTENT_LENGTH` of the body it de-chunked, `HTTP_CONNECTION`) reach no worker either.
#[test]
fn the_fastcgi_front_checks_the_host_it_is_given() {
    require("cgi-fcgi");
    let dir = tempfile::tempdir().unwrap();
    let fsock = dir.path().join("f.sock");
    let listen = format!("unix:{}", fsock.display());
    let _a = Anteroom::start(&[
        "--listen-fastcgi",
        &listen,
        "--workers",
        "1",
        "--",
        "python3",
        "tests/fixtures/conform_worker.py",
    ]);
    let cases: &[(Option<&str>, &str, &str)] = &[
        (
            Some("a.example:8080"),
            "Status: 200",
            "HTTP_HOST=a.example:8080\n",
        ),
        (None, "Status: 200", "REQUEST_URI=/f\n"),
        (Some("a.example b"), "Status: 400", "request id"),
        (Some("a.example/evil"), "Status: 400", "request id"),
    ];
    for (host, status, needle) in cases {
        let mut cmd = std::process::Command::new("cgi-fcgi");
        cmd.args(["-bind", "-connect", fsock.to_str().unwrap()])
            .env_clear()
            .env("REQUEST_METHOD", "GET")
            .env("REQUEST_URI", "/f")
            .env("SERVER_PROTOCOL", "HTTP/1.1")
            .env("HTTP_CONNECTION", "close, X-Hop")
            .env("HTTP_X_HOP", "1")
            .env("HTTP_TRANSFER_ENCODING", "chunked")
            .env("HTTP_KEEP_ALIVE", "timeout=5");
        if let Some(h) = host {
            cmd.env("HTTP_HOST", h);
        }
        let out = cmd.output().unwrap();
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(text.starts_with(status), "{host:?}: {text}");
        assert!(text.contains(needle), "{host:?}: {text}");
        assert_eq!(
            text.contains(ECHOED),
            *status == "Status: 200",
            "{host:?}: {text}"
        );
        for hop in [
            "HTTP_CONNECTION",
            "HTTP_X_HOP",
            "HTTP_TRANSFER_ENCODING",
            "HTTP_KEEP_ALIVE",
        ] {
            assert!(
                !text.contains(hop),
                "{host:?}: {hop} reached the worker:\n{text}"
            );
        }
    }
}
