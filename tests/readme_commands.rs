//! The README's command for each language, run as written (with `--workers 1`), and the failure seed 000's
//! operator spent days on: the process serving a GET is SIGKILLed mid-request. The client must get a 200
//! through the retry, and the log must say which request it was and what happened to its process.

mod common;

use std::thread;
use std::time::Duration;

use common::*;

/// anteroom with one worker, `opts`, and the README's command `cmd` after `--`.
fn start_one_worker(opts: &[&str], cmd: &[&str]) -> Anteroom {
    require(cmd[0]);
    let mut args = vec!["--workers", "1"];
    args.extend_from_slice(opts);
    args.push("--");
    args.extend_from_slice(cmd);
    Anteroom::start(&args)
}

/// Starts the README's command `cmd` (after `--`) with `opts` before it, sends a GET that takes 3 s,
/// SIGKILLs the process serving it (the spawned one, or its child when `child`), and returns the answer's
/// status and anteroom's log.
fn kill_during_get(opts: &[&str], cmd: &[&str], child: bool, id: &str) -> (u16, String) {
    let mut a = start_one_worker(opts, cmd);
    let addr = a.addr;
    let req = format!(
        "GET /?ms=3000 HTTP/1.1\r\nHost: t\r\nX-Request-Id: {id}\r\nConnection: close\r\n\r\n"
    );
    let t = thread::spawn(move || request(addr, req.as_bytes()).unwrap());
    thread::sleep(Duration::from_millis(800));
    let spawned = *children(a.pid()).first().expect("the worker process");
    let target = if child {
        *children(spawned).first().expect("the worker's own child")
    } else {
        spawned
    };
    signal(target, 9);
    let r = t.join().unwrap();
    a.stop();
    (r.status, a.log_text())
}

/// The death event names the signal and the request; the retry is logged.
fn assert_death_named(log: &str, id: &str) {
    let death = log
        .lines()
        .find(|l| l.contains("ERROR") && l.contains(" worker died "))
        .unwrap_or_else(|| panic!("no death event:\n{log}"));
    for needle in ["SIGKILL", id, "/?ms=3000"] {
        assert!(death.contains(needle), "{needle} missing from: {death}");
    }
    assert!(log.contains("retrying it on another worker"), "{log}");
}

#[test]
fn php_cgi() {
    let script = format!(
        "SCRIPT_FILENAME={}/examples/php/index.php",
        root().display()
    );
    let opts = ["--param", &script, "--env", "PHP_FCGI_MAX_REQUESTS=0"];
    let (status, log) = kill_during_get(&opts, &["php-cgi"], false, "php-kill");
    assert_eq!(status, 200, "{log}");
    assert_death_named(&log, "php-kill");
}

#[test]
fn perl_psgi_plackup() {
    let app = format!("{}/examples/perl/app.psgi", root().display());
    let cmd = ["plackup", "-s", "FCGI", "--manager=", &app];
    let (status, log) = kill_during_get(&[], &cmd, false, "psgi-kill");
    assert_eq!(status, 200, "{log}");
    assert_death_named(&log, "psgi-kill");
}

#[test]
fn perl_cgi_fast() {
    let app = format!("{}/examples/perl/cgi_fast.pl", root().display());
    let (status, log) = kill_during_get(&[], &["perl", &app], false, "cgifast-kill");
    assert_eq!(status, 200, "{log}");
    assert_death_named(&log, "cgifast-kill");
}

#[test]
fn python_flup() {
    let app = format!("{}/examples/python/app_flup.py", root().display());
    let (status, log) = kill_during_get(&[], &["python3", &app], false, "flup-kill");
    assert_eq!(status, 200, "{log}");
    assert_death_named(&log, "flup-kill");
}

/// gunicorn `-w 1` is an arbiter with one worker process under it: the arbiter, which anteroom started,
/// lives and starts a new worker, so anteroom sees no death, only the connection closed before the first
/// byte. The GET is still retried, and the close event names the request and the case.
#[test]
fn python_gunicorn_http() {
    let dir = format!("{}/examples/python", root().display());
    let cmd = ["gunicorn", "-w", "1", "--chdir", &dir, "app_wsgi:app"];
    let (status, log) =
        kill_during_get(&["--worker-protocol", "http"], &cmd, true, "gunicorn-kill");
    assert_eq!(status, 200, "{log}");
    let close = log
        .lines()
        .find(|l| l.contains("closed the connection before the first byte"))
        .unwrap_or_else(|| panic!("no close event:\n{log}"));
    assert!(
        close.contains("gunicorn-kill") && close.contains("/?ms=3000"),
        "{close}"
    );
}

/// Starts the README's command `cmd` with one worker, keeps it busy for 700 ms, and returns what a request
/// sent meanwhile says it waited (the examples print it from `X-Request-Start`).
fn waited_ms(opts: &[&str], cmd: &[&str]) -> u64 {
    let mut a = start_one_worker(opts, cmd);
    let addr = a.addr;
    // Warm: the worker is up and has served once.
    assert_eq!(get(addr, "/").status, 200, "{}", a.log_text());
    let busy = thread::spawn(move || get(addr, "/?ms=700"));
    thread::sleep(Duration::from_millis(150));
    let queued = get(addr, "/");
    assert_eq!(busy.join().unwrap().status, 200);
    a.stop();
    let text = queued.text();
    text.lines()
        .find_map(|l| l.strip_prefix("waited ")?.split(' ').next()?.parse().ok())
        .unwrap_or_else(|| panic!("no wait reported:\n{text}"))
}

/// `X-Request-Start` (`HTTP_X_REQUEST_START`) reaches the app in each language, FastCGI and HTTP workers,
/// and tells how long the request waited in anteroom: here about 550 ms behind a 700 ms request.
#[test]
fn each_language_is_told_when_anteroom_received_the_request() {
    let php = format!(
        "SCRIPT_FILENAME={}/examples/php/index.php",
        root().display()
    );
    let psgi = format!("{}/examples/perl/app.psgi", root().display());
    let flup = format!("{}/examples/python/app_flup.py", root().display());
    let py = format!("{}/examples/python", root().display());
    let cases: [(&str, Vec<&str>, Vec<&str>); 4] = [
        ("php-cgi", vec!["--param", &php], vec!["php-cgi"]),
        (
            "plackup",
            vec![],
            vec!["plackup", "-s", "FCGI", "--manager=", &psgi],
        ),
        ("flup", vec![], vec!["python3", &flup]),
        (
            "gunicorn",
            vec!["--worker-protocol", "http"],
            vec!["gunicorn", "-w", "1", "--chdir", &py, "app_wsgi:app"],
        ),
    ];
    for (name, opts, cmd) in &cases {
        let ms = waited_ms(opts, cmd);
        eprintln!("X-REQUEST-START {name}: waited {ms} ms");
        assert!((400..2000).contains(&ms), "{name}: waited {ms} ms");
    }
}
