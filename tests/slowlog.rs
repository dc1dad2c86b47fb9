//! The slow-request log (`--slowlog-timeout`) with a real flup worker sleeping in a function of a known
//! name: one event per slow request with the kernel's view of the worker, the dumper's output in it
//! (py-spy, installed by scripts/test), the status document's slow requests, nothing for a fast request,
//! and the events-per-minute budget; the README's gdb recipes for PHP (php-cgi) and Perl (FCGI), run as
//! written, name the PHP or Perl function too.

mod common;

use std::net::SocketAddr;
use std::thread;
use std::time::{Duration, Instant};

use common::*;

const APP: &[&str] = &["--", "python3", "tests/fixtures/slow_flup.py"];

fn start(opts: &[&str]) -> Anteroom {
    require("python3");
    let mut args = opts.to_vec();
    args.extend_from_slice(APP);
    Anteroom::start(&args)
}

/// GET `path` with request id `id`, in a thread.
fn get_with_id(addr: SocketAddr, path: &str, id: &str) -> thread::JoinHandle<Response> {
    let req = format!(
        "GET {path} HTTP/1.1\r\nHost: t\r\nX-Request-Id: {id}\r\nConnection: close\r\n\r\n"
    );
    thread::spawn(move || request(addr, req.as_bytes()).unwrap())
}

fn slow_events(log: &str) -> Vec<String> {
    log.lines()
        .filter(|l| l.contains("slow request: the worker has held it"))
        .map(str::to_owned)
        .collect()
}

fn wait_for_event(a: &Anteroom, within: Duration) -> String {
    wait_until("the slow-request event", within, || {
        !slow_events(&a.log_text()).is_empty()
    });
    slow_events(&a.log_text()).remove(0)
}

#[test]
fn a_slow_request_logs_one_event_with_the_kernels_view_and_goes_on() {
    let a = start(&["--workers", "1", "--slowlog-timeout", "1"]);
    let t = Instant::now();
    let client = get_with_id(a.addr, "/sleepy?s=3", "slow-1");
    let event = wait_for_event(&a, Duration::from_secs(10));
    let r = client.join().unwrap();
    assert_eq!(r.status, 200, "the slow request must go on: {}", r.text());
    assert!(t.elapsed() >= Duration::from_secs(3));
    for needle in [
        "slow-1",
        "method=GET",
        "/sleepy?s=3",
        "slot=0",
        "pid=",
        "running_ms=1",
        "state=",
        "syscall=",
        "kernel_stack=",
        "cpu_ms=",
        "rss_bytes=",
    ] {
        assert!(event.contains(needle), "{needle} missing from: {event}");
    }
    // flup serves the request on a thread of its pool, while the main thread waits in select: the
    // sleeping thread is among `threads`, in Python's time.sleep (clock_nanosleep since 3.11, select
    // before), its call named from its number.
    let threads = event
        .split("threads=\"")
        .nth(1)
        .unwrap_or_else(|| panic!("no threads field: {event}"));
    let threads = &threads[..threads.find('"').unwrap_or(threads.len())];
    // "TID STATE WCHAN SYSCALL(ARGS)", one a line (escaped as \n in the text log).
    let sleeping = threads.split("\\n").any(|t| {
        let f: Vec<&str> = t.split(' ').collect();
        f.len() >= 4
            && f[1] == "S"
            && f[2] != "-"
            && (f[3].starts_with("clock_nanosleep(") || f[3].starts_with("select("))
    });
    assert!(
        sleeping,
        "no thread asleep in time.sleep, with its wchan: {event}"
    );
    assert!(!event.contains("dump="), "no command, no dump: {event}");
    // Once per request, though it ran three times the threshold.
    thread::sleep(Duration::from_millis(300));
    assert_eq!(slow_events(&a.log_text()).len(), 1, "{}", a.log_text());
}

#[test]
fn with_py_spy_the_event_names_the_function_the_worker_is_in() {
    require("py-spy");
    let a = start(&[
        "--workers",
        "1",
        "--slowlog-timeout",
        "1",
        "--slowlog-command",
        "py-spy dump --pid {pid}",
    ]);
    let client = get_with_id(a.addr, "/sleepy?s=6", "spy-1");
    let event = wait_for_event(&a, Duration::from_secs(15));
    assert_eq!(client.join().unwrap().status, 200);
    for needle in [
        "spy-1",
        "dump_command=\"py-spy dump --pid ",
        "dump_end=exit code 0",
        "sleepy_known_function",
        "syscall=",
    ] {
        assert!(event.contains(needle), "{needle} missing from: {event}");
    }
    assert_eq!(slow_events(&a.log_text()).len(), 1);
}

#[test]
fn a_fast_request_logs_nothing() {
    let a = start(&["--workers", "2", "--slowlog-timeout", "1"]);
    for _ in 0..5 {
        assert_eq!(a.get("/sleep?ms=10").status, 200);
    }
    // Just under the threshold.
    assert_eq!(a.get("/sleepy?s=0.6").status, 200);
    thread::sleep(Duration::from_millis(1500));
    let log = a.log_text();
    assert!(slow_events(&log).is_empty(), "{log}");
}

#[test]
fn the_budget_holds_back_events_beyond_the_rate() {
    let a = start(&[
        "--workers",
        "3",
        "--slowlog-timeout",
        "0.5",
        "--slowlog-rate",
        "2",
    ]);
    let clients: Vec<_> = (0..3)
        .map(|i| get_with_id(a.addr, "/sleepy?s=1.5", &format!("many-{i}")))
        .collect();
    for c in clients {
        assert_eq!(c.join().unwrap().status, 200);
    }
    thread::sleep(Duration::from_millis(300));
    let log = a.log_text();
    assert_eq!(slow_events(&log).len(), 2, "{log}");
}

#[test]
fn the_status_document_lists_the_slow_request_while_it_runs() {
    let port = free_port();
    let admin: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    let admin_arg = admin.to_string();
    let a = start(&[
        "--workers",
        "2",
        "--slowlog-timeout",
        "0.5",
        "--admin",
        &admin_arg,
    ]);
    let status = || -> serde_json::Value {
        let r = request(
            admin,
            b"GET /status HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n",
        )
        .unwrap();
        serde_json::from_slice(&r.body).unwrap()
    };
    assert_eq!(status()["slow_requests"].as_array().map(Vec::len), Some(0));
    assert_eq!(status()["slowlog_timeout_s"].as_f64(), Some(0.5));
    let client = get_with_id(a.addr, "/sleepy?s=2", "shown-1");
    let mut seen = None;
    wait_until(
        "the slow request on /status",
        Duration::from_secs(5),
        || {
            let s = status();
            let slow = s["slow_requests"].as_array().cloned().unwrap_or_default();
            seen = slow.first().cloned();
            seen.is_some()
        },
    );
    let seen = seen.unwrap();
    assert_eq!(seen["request_id"], "shown-1", "{seen}");
    assert!(seen["running_ms"].as_u64().unwrap() >= 500, "{seen}");
    let s = status();
    let busy: Vec<_> = s["workers"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|w| w["slow"] == true)
        .collect();
    assert_eq!(busy.len(), 1, "{s}");
    assert_eq!(client.join().unwrap().status, 200);
    assert_eq!(status()["slow_requests"].as_array().map(Vec::len), Some(0));
}

/// One slow request on one worker started with `opts` and `cmd`; its event.
fn event_with(opts: &[&str], cmd: &[&str], path: &str) -> String {
    let mut args = opts.to_vec();
    args.push("--");
    args.extend_from_slice(cmd);
    let a = Anteroom::start(&args);
    let client = get_with_id(a.addr, path, "recipe-1");
    let event = wait_for_event(&a, Duration::from_secs(20));
    assert_eq!(client.join().unwrap().status, 200, "{}", a.log_text());
    event
}

#[test]
fn the_php_recipe_names_the_php_function() {
    require("php-cgi");
    require("gdb");
    let script = format!(
        "SCRIPT_FILENAME={}/tests/fixtures/slow.php",
        root().display()
    );
    let event = event_with(
        &[
            "--workers",
            "1",
            "--slowlog-timeout",
            "1",
            "--slowlog-command",
            "gdb -p {pid} -batch -x examples/slowlog/php-backtrace.gdb 2>&1",
            "--param",
            &script,
        ],
        &["php-cgi"],
        // Long enough for gdb to attach on a loaded machine (at 2.5 s it once found the request done).
        "/?s=6",
    );
    for needle in [
        "recipe-1",
        "[function] => sleepy_known_function",
        "slow.php",
    ] {
        assert!(event.contains(needle), "{needle} missing from: {event}");
    }
}

#[test]
fn the_perl_recipe_names_the_perl_function() {
    require("perl");
    require("gdb");
    let event = event_with(
        &[
            "--workers",
            "1",
            "--slowlog-timeout",
            "1",
            "--slowlog-command",
            "gdb -p {pid} -batch -x examples/slowlog/perl-backtrace.gdb 2>&1",
        ],
        &["perl", "tests/fixtures/slow_fcgi.pl"],
        // Long enough for gdb to attach on a loaded machine (at 2.5 s it once found the request done).
        "/?s=6",
    );
    for needle in ["recipe-1", "main::sleepy_known_function", "slow_fcgi.pl"] {
        assert!(event.contains(needle), "{needle} missing from: {event}");
    }
}
