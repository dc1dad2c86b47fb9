//! A request that never reached the worker is never lost (issue 9, part 5).
//!
//! gunicorn's sync worker closes its connection after every response. A proxy that keeps that connection for
//! the next request races the worker's close: the next request is written to a socket the worker has just
//! shut, and used to come back as a 502 with nothing sent and nothing received (14 in 20,000 requests here
//! with a trivial app that sends no Content-Length). Now anteroom does not keep such a connection, and a
//! request that found its kept-alive connection closed goes again on a new one.
//!
//! Short form for scripts/test; `ANTEROOM_FAULTS=long` runs the full count, for bench/run. Each case
//! prints one `FAULT-RESULT {json}` line.

mod common;

use std::collections::BTreeMap;
use std::process::{Command, Stdio};

use common::*;

/// Runs oha and returns its status counts and error counts.
fn oha(args: &[&str], url: &str) -> (BTreeMap<u16, u64>, BTreeMap<String, u64>) {
    require("oha");
    let out = Command::new("oha")
        .args(args)
        .args(["--no-tui", "--output-format", "json"])
        .arg(url)
        .stdin(Stdio::null())
        .stderr(Stdio::inherit())
        .output()
        .expect("oha runs");
    let json: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "oha's output is not JSON ({e}): {}",
            String::from_utf8_lossy(&out.stdout)
        )
    });
    let statuses = json["statusCodeDistribution"]
        .as_object()
        .unwrap_or_else(|| panic!("no statusCodeDistribution in {json}"))
        .iter()
        .map(|(k, v)| (k.parse().unwrap(), v.as_u64().unwrap()))
        .collect();
    let errors = json["errorDistribution"]
        .as_object()
        .unwrap_or_else(|| panic!("no errorDistribution in {json}"))
        .iter()
        .map(|(k, v)| (k.clone(), v.as_u64().unwrap()))
        .collect();
    (statuses, errors)
}

#[test]
fn gunicorn_sync_workers_lose_no_request() {
    require("gunicorn");
    let n: u64 = if long_form() { 60_000 } else { 20_000 };
    let mut a = Anteroom::start(&[
        "--workers",
        "4",
        "--worker-protocol",
        "http",
        "--",
        "gunicorn",
        "-w",
        "1",
        "--chdir",
        "tests/fixtures",
        "trivial_wsgi:app",
    ]);
    let url = format!("http://{}/", a.addr);
    let (statuses, errors) = oha(&["-n", &n.to_string(), "-c", "50"], &url);
    let ok = statuses.get(&200).copied().unwrap_or(0);
    let log = a.log_text();
    a.stop();
    let pass = ok == n && errors.is_empty();
    fault_result(
        "gunicorn-sync",
        &format!("{n} requests at c=50 to 4 gunicorn -w 1 HTTP workers (sync, trivial app without Content-Length)"),
        &format!("{ok} of {n} answered 200; other statuses {statuses:?}; errors {errors:?}"),
        "zero 502s, every request 200",
        pass,
    );
    assert!(
        pass,
        "expected {n} × 200, got {statuses:?}, errors {errors:?}; anteroom's log:\n{}",
        log.lines()
            .filter(|l| !l.contains("INFO"))
            .take(40)
            .collect::<Vec<_>>()
            .join("\n")
    );
}

/// A worker whose keep-alive timeout crosses every second request (tests/fixtures/keepalive_race.py): the
/// GETs go again on a new connection and all get 200; a POST, which the worker did take in, gets a 502 that
/// names its request id, never a reset or a hang.
#[test]
fn a_keep_alive_timeout_race_loses_no_get() {
    let a = Anteroom::start_env(
        &[
            "--workers",
            "1",
            "--worker-protocol",
            "http",
            "--",
            "python3",
            "tests/fixtures/keepalive_race.py",
        ],
        &[],
        Some("/ready"),
    );
    let n = if long_form() { 2000 } else { 200 };
    let mut ok = 0;
    for i in 0..n {
        let r = a.get(&format!("/get/{i}"));
        if r.status == 200 {
            ok += 1;
        }
    }
    let mut posts = Vec::new();
    for i in 0..20 {
        let body = format!("n={i}");
        let req = format!(
            "POST /post/{i} HTTP/1.1\r\nHost: t\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
            body.len()
        );
        let r = request(a.addr, req.as_bytes()).expect("a response, not a reset");
        posts.push((r.status, r.header("x-request-id"), r.text()));
    }
    let bad_posts: Vec<_> = posts
        .iter()
        .filter(|(s, id, text)| {
            !(*s == 200 || (*s == 502 && id.as_ref().is_some_and(|id| text.contains(id.as_str()))))
        })
        .collect();
    let failed_posts = posts.iter().filter(|p| p.0 == 502).count();
    let pass = ok == n && bad_posts.is_empty() && failed_posts > 0;
    fault_result(
        "keepalive-race",
        "a worker that closes every kept-alive connection just as the next request arrives",
        &format!("GETs: {ok} of {n} answered 200; POSTs: {failed_posts} of 20 got a 502 naming the request id, the rest 200"),
        "every GET 200; a failed POST is a 502 with its request id",
        pass,
    );
    assert_eq!(ok, n, "GETs lost; log:\n{}", a.log_text());
    assert!(
        bad_posts.is_empty(),
        "POSTs answered otherwise: {bad_posts:?}"
    );
    // The race did happen (else this test tests nothing): some POSTs met a closed connection.
    assert!(failed_posts > 0, "no POST met the race: {posts:?}");
}
