//! Workers that hide their processes, and connections closed before the first byte of the response
//! (issue 11, item 2), against real Plack FastCGI workers: `plackup -s FCGI` without `--manager=` runs an
//! FCGI::ProcManager whose children accept, so anteroom never sees them die.

mod common;

use std::thread;
use std::time::Duration;

use common::*;

const WARNING: &str = "the worker hides its processes";

fn plack(workers: &str, manager: bool) -> Anteroom {
    require("plackup");
    let mut args = vec!["--workers", workers, "--", "plackup", "-s", "FCGI"];
    if manager {
        args.push("--manager=");
    }
    args.push("bench/apps/app.psgi");
    Anteroom::start(&args)
}

/// The worker processes anteroom started (its children), each with its own children.
fn workers(a: &Anteroom) -> Vec<(u32, Vec<u32>)> {
    children(a.pid())
        .into_iter()
        .map(|w| (w, children(w)))
        .collect()
}

/// Sends a GET that takes 3 s in a thread, and returns its handle once the request has had time to reach
/// a worker.
fn slow_get(a: &Anteroom, id: &str) -> thread::JoinHandle<Response> {
    let addr = a.addr;
    let req = format!(
        "GET /?ms=3000 HTTP/1.1\r\nHost: t\r\nX-Request-Id: {id}\r\nConnection: close\r\n\r\n"
    );
    let t = thread::spawn(move || request(addr, req.as_bytes()).unwrap());
    thread::sleep(Duration::from_millis(800));
    t
}

fn warnings(log: &str) -> Vec<&str> {
    log.lines().filter(|l| l.contains(WARNING)).collect()
}

#[test]
fn a_worker_with_a_process_manager_is_named_once_per_slot() {
    let a = plack("2", false);
    wait_until("one warning per slot", Duration::from_secs(10), || {
        warnings(&a.log_text()).len() >= 2
    });
    // Serving, and a worker restart in the slot, say nothing more.
    for _ in 0..10 {
        assert_eq!(a.get("/").status, 200);
    }
    let (manager, _) = workers(&a)[0];
    signal(manager, 9);
    wait_until("the worker to be replaced", Duration::from_secs(10), || {
        a.log_text().matches("worker started").count() >= 3
    });
    thread::sleep(Duration::from_millis(1500));
    assert_eq!(a.get("/").status, 200);
    let log = a.log_text();
    let w = warnings(&log);
    assert_eq!(w.len(), 2, "{log}");
    for slot in ["slot=0", "slot=1"] {
        assert_eq!(w.iter().filter(|l| l.contains(slot)).count(), 1, "{log}");
    }
    for needle in ["FCGI::ProcManager", "--manager=", "accepting="] {
        assert!(w[0].contains(needle), "{needle} missing from: {}", w[0]);
    }
    println!("HIDDEN-WARNING {}", w[0]);
}

#[test]
fn a_worker_in_one_process_is_not_warned_about() {
    let a = plack("1", true);
    for _ in 0..5 {
        assert_eq!(a.get("/").status, 200);
    }
    thread::sleep(Duration::from_millis(1000));
    let log = a.log_text();
    assert!(warnings(&log).is_empty(), "{log}");
}

#[test]
fn a_get_whose_hidden_process_is_killed_is_retried_and_the_close_names_the_case() {
    let a = plack("1", false);
    let t = slow_get(&a, "hid-1");
    let (manager, kids) = workers(&a)
        .pop()
        .expect("the worker process (a ProcManager)");
    assert!(!kids.is_empty(), "the ProcManager has no children");
    for kid in &kids {
        signal(*kid, 9);
    }
    let r = t.join().unwrap();
    let log = a.log_text();
    assert_eq!(r.status, 200, "{}\n{log}", r.text());
    assert!(alive(manager), "the manager itself died:\n{log}");
    let close = log
        .lines()
        .find(|l| l.contains("closed the connection before the first byte"))
        .unwrap_or_else(|| panic!("no close event:\n{log}"));
    for needle in [
        "hid-1",
        "worker alive but closed",
        "slot=0",
        &format!("pid={manager}"),
    ] {
        assert!(close.contains(needle), "{needle} missing from: {close}");
    }
    // The worker did not die: no death event, nothing for the quarantine.
    assert!(
        !log.lines()
            .any(|l| l.contains("ERROR") && l.contains(" worker died ")),
        "{log}"
    );
    println!("HIDDEN-CLOSE {close}");
}

#[test]
fn a_get_whose_worker_is_killed_is_retried_and_the_death_names_signal_and_request() {
    let a = plack("1", true);
    let t = slow_get(&a, "kill-1");
    let (worker, _) = workers(&a).pop().expect("the worker process");
    signal(worker, 9);
    let r = t.join().unwrap();
    let log = a.log_text();
    assert_eq!(r.status, 200, "{}\n{log}", r.text());
    let death = log
        .lines()
        .find(|l| l.contains("ERROR") && l.contains(" worker died "))
        .unwrap_or_else(|| panic!("no death event:\n{log}"));
    for needle in ["SIGKILL", "kill-1", "/?ms=3000"] {
        assert!(death.contains(needle), "{needle} missing from: {death}");
    }
    let close = log
        .lines()
        .find(|l| l.contains("closed the connection before the first byte"))
        .unwrap_or_else(|| panic!("no close event:\n{log}"));
    assert!(
        close.contains("worker process died")
            && close.contains("SIGKILL")
            && close.contains("kill-1"),
        "{close}"
    );
    assert!(log.contains("retrying it on another worker"), "{log}");
    println!("KILL-CLOSE {close}\nKILL-DEATH {death}");
}

#[test]
fn a_post_whose_hidden_process_is_killed_gets_a_502_naming_it() {
    let a = plack("1", false);
    let addr = a.addr;
    let t = thread::spawn(move || {
        request(
            addr,
            b"POST /?ms=3000 HTTP/1.1\r\nHost: t\r\nX-Request-Id: hid-post\r\nContent-Length: 2\r\nConnection: close\r\n\r\nhi",
        )
        .unwrap()
    });
    thread::sleep(Duration::from_millis(800));
    let (_, kids) = workers(&a).pop().expect("the worker process");
    for kid in &kids {
        signal(*kid, 9);
    }
    let r = t.join().unwrap();
    assert_eq!(r.status, 502, "{}\n{}", r.text(), a.log_text());
    assert!(r.text().contains("hid-post"), "{}", r.text());
}
