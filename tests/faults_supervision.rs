//! Issue 9, parts 1 and 2 as fault cases: slot health is derived, not latched (early deaths), and only
//! what a request caused is quarantined (kills from outside under load, the seed-000 poison URL).
//!
//! Each case has a short form (seconds, for scripts/test) and a long form (ANTEROOM_FAULTS=long, for
//! bench/run), asserts its target in both, and prints one `FAULT-RESULT {json}` line.

mod common;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use common::*;

const APP: &str = "tests/fixtures/supervised_app.py";

/// anteroom with its admin listener on a free port, running the fixture app with `env` for the workers.
fn start(args: &[&str], worker_env: &[String], ready_path: Option<&str>) -> (Anteroom, SocketAddr) {
    require("python3");
    let admin: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    let admin_arg = admin.to_string();
    let mut all: Vec<&str> = vec!["--admin", &admin_arg];
    for e in worker_env {
        all.extend_from_slice(&["--env", e]);
    }
    all.extend_from_slice(args);
    all.extend_from_slice(&["--", "python3", APP]);
    (Anteroom::start_env(&all, &[], ready_path), admin)
}

fn admin_get(admin: SocketAddr, path: &str) -> Response {
    request(
        admin,
        format!("GET {path} HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n").as_bytes(),
    )
    .unwrap_or_else(|e| panic!("admin GET {path}: {e}"))
}

/// (pid, state) of every worker slot, from /status.
fn workers(admin: SocketAddr) -> Vec<(u32, String)> {
    let r = admin_get(admin, "/status");
    let v: serde_json::Value = serde_json::from_slice(&r.body).unwrap();
    v["workers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|w| {
            (
                w["pid"].as_u64().unwrap() as u32,
                w["state"].as_str().unwrap().to_string(),
            )
        })
        .collect()
}

/// Waits for a worker in `state` whose pid is not `old`; returns its pid.
fn wait_for_worker(admin: SocketAddr, state: &str, old: &[u32], within: Duration) -> u32 {
    let deadline = Instant::now() + within;
    loop {
        if let Some((pid, _)) = workers(admin)
            .into_iter()
            .find(|(p, s)| s == state && *p > 0 && !old.contains(p))
        {
            return pid;
        }
        assert!(
            Instant::now() < deadline,
            "no new {state} worker within {within:?}"
        );
        thread::sleep(Duration::from_millis(10));
    }
}

/// After a worker was replaced: the first request from the moment the replacement is ready is a 200, and
/// so is /health/ready. Returns the time from seeing it ready to that 200.
fn first_request_after_ready(a: &Anteroom, admin: SocketAddr, old: &[u32]) -> Duration {
    wait_for_worker(admin, "idle", old, Duration::from_secs(20));
    let t = Instant::now();
    let r = a.get("/sleep?ms=1");
    let took = t.elapsed();
    assert_eq!(r.status, 200, "{}\n{}", r.text(), a.log_text());
    let h = admin_get(admin, "/health/ready");
    assert_eq!(h.status, 200, "{}\n{}", h.text(), a.log_text());
    // And it stays so: the failure is not latched.
    for _ in 0..5 {
        assert_eq!(a.get("/sleep?ms=1").status, 200);
    }
    took
}

#[test]
fn early_death_after_ready_does_not_latch() {
    // --workers 1, the worker SIGKILLed when ready but before its first request (the short form once,
    // the long form every 5 s for 60 s).
    let (a, admin) = start(&["--workers", "1"], &[], Some("/health/ready"));
    let rounds = if long_form() { 12 } else { 2 };
    let mut worst = Duration::ZERO;
    // The worker that answered anteroom's start-up check has served: replace it by a fresh one first.
    let mut old = children(a.pid());
    for p in &old {
        signal(*p, 9);
    }
    for round in 0..rounds {
        // A fresh worker, ready, that has served nothing.
        let pid = wait_for_worker(admin, "idle", &old, Duration::from_secs(20));
        old.push(pid);
        signal(pid, 9);
        worst = worst.max(first_request_after_ready(&a, admin, &old));
        // Its replacement has served now: make way for a fresh one for the next round.
        for p in children(a.pid()) {
            old.push(p);
            signal(p, 9);
        }
        if long_form() && round + 1 < rounds {
            thread::sleep(Duration::from_secs(5));
        }
    }
    let ok = worst < Duration::from_secs(1);
    fault_result(
        "latch-ready",
        "--workers 1, worker SIGKILLed after it was ready, before its first request",
        &format!(
            "{rounds} kills; first request after the replacement was ready: 200 in at most {} ms; /health/ready 200",
            worst.as_millis()
        ),
        "next request 200 within 1 s of the replacement being ready; /health/ready 200",
        ok,
    );
    assert!(ok, "took {worst:?}");
}

#[test]
fn early_death_during_start_does_not_latch() {
    // The worker is SIGKILLed while it starts (it sleeps before accepting): a failed start, so the slot is
    // failing and requests are refused, until the next start succeeds, which clears it at once.
    let dir = tempfile::tempdir().unwrap();
    let delay = dir.path().join("delay");
    let (a, admin) = start(
        &["--workers", "1"],
        &[format!("START_DELAY_FILE={}", delay.display())],
        Some("/health/ready"),
    );
    let rounds = if long_form() { 10 } else { 2 };
    let mut worst = Duration::ZERO;
    let mut refused = 0;
    let mut old = children(a.pid());
    for _ in 0..rounds {
        std::fs::write(&delay, "3000").unwrap();
        // Replace the ready worker; its replacement sleeps 3 s before accepting. Kill it then.
        for p in children(a.pid()) {
            signal(p, 9);
        }
        let starting = wait_for_worker(admin, "starting", &old, Duration::from_secs(20));
        old.push(starting);
        signal(starting, 9);
        wait_until("the failed start", Duration::from_secs(10), || {
            admin_get(admin, "/health/ready").status == 503
        });
        // The only slot is failing: refused at once rather than left waiting.
        let r = a.get("/sleep?ms=1");
        if r.status == 503 {
            refused += 1;
        }
        std::fs::remove_file(&delay).unwrap();
        worst = worst.max(first_request_after_ready(&a, admin, &old));
        old.extend(children(a.pid()));
    }
    let ok = worst < Duration::from_secs(1);
    fault_result(
        "latch-start",
        "--workers 1, worker SIGKILLed while starting (before it was ready)",
        &format!(
            "{rounds} kills; {refused} refused while failing; first request after the replacement was ready: 200 in at most {} ms; /health/ready 200",
            worst.as_millis()
        ),
        "next request 200 within 1 s of the replacement being ready; /health/ready 200",
        ok,
    );
    assert!(ok, "took {worst:?}");
}

#[test]
fn an_app_that_fails_until_its_database_is_up_serves_once_it_starts() {
    let dir = tempfile::tempdir().unwrap();
    let marker = dir.path().join("db-up");
    let (a, admin) = start(
        &["--workers", "2"],
        &[format!("DB_MARKER={}", marker.display())],
        None,
    );
    let down_for = Duration::from_secs(if long_form() { 10 } else { 3 });
    thread::sleep(down_for);
    let r = a.get("/sleep?ms=1");
    assert_eq!(r.status, 503, "{}", r.text());
    assert!(a.log_text().contains("database is down"));
    // The backoff step the slots have reached: the delay before their next start, from the recent deaths.
    let status: serde_json::Value =
        serde_json::from_slice(&admin_get(admin, "/status").body).unwrap();
    let step = status["deaths"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|d| d["restart_in_ms"].as_u64())
        .max()
        .unwrap_or(0);
    // The database comes up.
    std::fs::write(&marker, "").unwrap();
    let up = Instant::now();
    let pid = wait_for_worker(admin, "idle", &[], Duration::from_secs(40));
    let started_cleanly = up.elapsed();
    let t = Instant::now();
    let r = a.get("/sleep?ms=1");
    let first = t.elapsed();
    assert_eq!(r.status, 200, "{}\n{}", r.text(), a.log_text());
    assert_eq!(admin_get(admin, "/health/ready").status, 200);
    let mut ok200 = 1;
    for _ in 0..20 {
        ok200 += u32::from(a.get("/sleep?ms=1").status == 200);
    }
    let log = a.log_text();
    // The first clean start comes at the slots' next try: within one backoff step (plus its jitter and
    // the app's own start-up time) of the database coming up.
    let within_step =
        started_cleanly < Duration::from_millis(step * 6 / 5) + Duration::from_secs(5);
    let ok = ok200 == 21 && first < Duration::from_secs(1) && within_step;
    fault_result(
        "db-down",
        &format!(
            "an app that exits at start for {} s (until its database is up), then starts cleanly",
            down_for.as_secs()
        ),
        &format!(
            "first clean start (pid {pid}) {} ms after the database came up (backoff step then {step} ms); first request after it 200 in {} ms; {ok200}/21 200s",
            started_cleanly.as_millis(),
            first.as_millis()
        ),
        "serving within one backoff step after it first starts cleanly",
        ok,
    );
    assert!(ok, "{ok200}/21 200s, first in {first:?}\n{log}");
}

#[derive(Default)]
struct Tally {
    ok: AtomicU64,
    /// 502s whose x-request-id and body name the request.
    named_502: AtomicU64,
    other: AtomicU64,
    io_errors: AtomicU64,
    examples: Mutex<Vec<String>>,
}

impl Tally {
    fn total(&self) -> u64 {
        self.ok.load(Ordering::Relaxed)
            + self.named_502.load(Ordering::Relaxed)
            + self.other.load(Ordering::Relaxed)
            + self.io_errors.load(Ordering::Relaxed)
    }

    fn example(&self, s: String) {
        let mut e = self.examples.lock().unwrap();
        if e.len() < 10 {
            e.push(s);
        }
    }
}

/// Steady load from `clients` threads for `run`, while another thread SIGKILLs a random worker every
/// 200 ms. Returns the tally and the number of kills.
fn chaos(a: &Anteroom, post: bool, clients: usize, run: Duration) -> (Arc<Tally>, u64) {
    let tally = Arc::new(Tally::default());
    let done = Arc::new(AtomicBool::new(false));
    let addr = a.addr;
    let load: Vec<_> = (0..clients)
        .map(|c| {
            let (tally, done) = (tally.clone(), done.clone());
            thread::spawn(move || {
                let mut n = 0u64;
                while !done.load(Ordering::Relaxed) {
                    n += 1;
                    let id = format!("chaos-{c}-{n}");
                    let req = if post {
                        format!("POST /sleep?ms=20 HTTP/1.1\r\nHost: t\r\nX-Request-Id: {id}\r\nContent-Length: 5\r\nConnection: close\r\n\r\nhello")
                    } else {
                        format!("GET /sleep?ms=20 HTTP/1.1\r\nHost: t\r\nX-Request-Id: {id}\r\nConnection: close\r\n\r\n")
                    };
                    match request(addr, req.as_bytes()) {
                        Ok(r) if r.status == 200 => {
                            tally.ok.fetch_add(1, Ordering::Relaxed);
                        }
                        Ok(r)
                            if r.status == 502
                                && r.header("x-request-id").as_deref() == Some(id.as_str())
                                && r.text().contains(&id) =>
                        {
                            tally.named_502.fetch_add(1, Ordering::Relaxed);
                            tally.example(format!("{id}: 502 {}", r.text().trim()));
                        }
                        Ok(r) => {
                            tally.other.fetch_add(1, Ordering::Relaxed);
                            tally.example(format!("{id}: {} {}", r.status, r.text().trim()));
                        }
                        Err(e) => {
                            tally.io_errors.fetch_add(1, Ordering::Relaxed);
                            tally.example(format!("{id}: {e}"));
                        }
                    }
                }
            })
        })
        .collect();
    let pid = a.pid();
    let started = Instant::now();
    let mut kills = 0;
    while started.elapsed() < run {
        thread::sleep(Duration::from_millis(200));
        let workers = children(pid);
        if !workers.is_empty() {
            signal(workers[fastrand::usize(..workers.len())], 9);
            kills += 1;
        }
    }
    done.store(true, Ordering::Relaxed);
    for l in load {
        l.join().unwrap();
    }
    (tally, kills)
}

fn chaos_run() -> Duration {
    Duration::from_secs(if long_form() { 60 } else { 8 })
}

#[test]
fn kills_every_200ms_under_get_load_lose_nothing_and_quarantine_nothing() {
    let (a, admin) = start(&["--workers", "4"], &[], Some("/sleep?ms=1"));
    let run = chaos_run();
    let (t, kills) = chaos(&a, false, 8, run);
    let total = t.total();
    let ok = t.ok.load(Ordering::Relaxed);
    // Afterwards: every worker back, and nothing refused (the outage was 200 s of 503s with idle workers).
    wait_until("4 idle workers", Duration::from_secs(30), || {
        workers(admin).iter().filter(|(_, s)| s == "idle").count() == 4
    });
    assert_eq!(a.get("/sleep?ms=1").status, 200);
    assert_eq!(admin_get(admin, "/health/ready").status, 200);
    let log = a.log_text();
    let quarantined = log.contains("refusing it with 503");
    let share = ok as f64 / total.max(1) as f64;
    let pass = share >= 0.999 && !quarantined && !log.contains("bug:");
    fault_result(
        "chaos-get",
        &format!(
            "4 flup workers, GET /sleep?ms=20 from 8 clients for {} s, a random worker SIGKILLed every 200 ms, default options",
            run.as_secs()
        ),
        &format!(
            "{kills} kills; {ok} of {total} 200 ({:.3}%), {} 502, {} other, {} I/O errors; quarantined: {}",
            share * 100.0,
            t.named_502.load(Ordering::Relaxed),
            t.other.load(Ordering::Relaxed),
            t.io_errors.load(Ordering::Relaxed),
            if quarantined { "yes" } else { "no" }
        ),
        ">= 99.9% 200s; no URL quarantined",
        pass,
    );
    assert!(
        kills >= 10 && total >= 200,
        "{kills} kills, {total} requests"
    );
    assert!(
        pass,
        "{ok}/{total}; examples: {:#?}\n{}",
        t.examples.lock().unwrap(),
        log.lines()
            .filter(|l| l.contains("ERROR") || l.contains("WARN"))
            .take(60)
            .collect::<Vec<_>>()
            .join("\n")
    );
}

#[test]
fn kills_every_200ms_under_post_load_fail_only_as_502s_with_an_id() {
    let (a, _admin) = start(&["--workers", "4"], &[], Some("/sleep?ms=1"));
    let run = chaos_run();
    let (t, kills) = chaos(&a, true, 8, run);
    let total = t.total();
    let (ok, named, other, io) = (
        t.ok.load(Ordering::Relaxed),
        t.named_502.load(Ordering::Relaxed),
        t.other.load(Ordering::Relaxed),
        t.io_errors.load(Ordering::Relaxed),
    );
    let log = a.log_text();
    let pass = other == 0 && io == 0 && !log.contains("bug:");
    fault_result(
        "chaos-post",
        &format!(
            "4 flup workers, POST /sleep?ms=20 from 8 clients for {} s, a random worker SIGKILLed every 200 ms, default options",
            run.as_secs()
        ),
        &format!(
            "{kills} kills; {ok} of {total} 200, {named} 502 naming the request id, {other} other, {io} resets or I/O errors"
        ),
        "every failure is a 502 naming its request id; no resets",
        pass,
    );
    assert!(
        kills >= 10 && total >= 200,
        "{kills} kills, {total} requests"
    );
    assert!(
        pass,
        "examples: {:#?}\n{}",
        t.examples.lock().unwrap(),
        log.lines()
            .filter(|l| l.contains("ERROR") || l.contains("WARN"))
            .take(60)
            .collect::<Vec<_>>()
            .join("\n")
    );
}

#[test]
fn a_url_whose_every_request_kills_its_worker_is_quarantined_after_3_deaths() {
    // Seed 000: the app SIGKILLs its own worker on one URL. Other URLs are under load meanwhile.
    let (a, _admin) = start(&["--workers", "4"], &[], Some("/sleep?ms=1"));
    let done = Arc::new(AtomicBool::new(false));
    let others = Arc::new(Tally::default());
    let addr = a.addr;
    let load: Vec<_> = (0..4)
        .map(|_| {
            let (done, others) = (done.clone(), others.clone());
            thread::spawn(move || {
                while !done.load(Ordering::Relaxed) {
                    match request(
                        addr,
                        b"GET /sleep?ms=5 HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n",
                    ) {
                        Ok(r) if r.status == 200 => others.ok.fetch_add(1, Ordering::Relaxed),
                        Ok(r) => {
                            others.example(format!("{} {}", r.status, r.text()));
                            others.other.fetch_add(1, Ordering::Relaxed)
                        }
                        Err(e) => {
                            others.example(e.to_string());
                            others.io_errors.fetch_add(1, Ordering::Relaxed)
                        }
                    };
                }
            })
        })
        .collect();
    // Rounds of poison requests: the long form repeats after each cool-down would be too long (300 s), so
    // it sends more requests into the quarantine instead.
    let poison = if long_form() { 50 } else { 6 };
    let mut statuses = Vec::new();
    for _ in 0..poison {
        statuses.push(a.get("/crash").status);
    }
    thread::sleep(Duration::from_secs(if long_form() { 10 } else { 1 }));
    done.store(true, Ordering::Relaxed);
    for l in load {
        l.join().unwrap();
    }
    let log = a.log_text();
    let deaths = log
        .lines()
        // The death events (the retry's warning says "worker died" too).
        .filter(|l| l.contains("ERROR") && l.contains(" worker died ") && l.contains("GET /crash"))
        .count();
    let quarantine_line = log
        .lines()
        .find(|l| l.contains("refusing it with 503"))
        .unwrap_or("")
        .to_string();
    let others_ok = others.ok.load(Ordering::Relaxed);
    let others_total = others.total();
    // 502 (death, retried, death), 502 (the third death quarantines it), then 503 for every later one.
    let expected: Vec<u16> = [502, 502]
        .into_iter()
        .chain(std::iter::repeat(503))
        .take(poison)
        .collect();
    let pass = statuses == expected
        && deaths == 3
        && quarantine_line.contains("killed 3 workers in 3 requests")
        && others_ok == others_total
        && others_total > 0;
    fault_result(
        "poison",
        "seed 000: GET /crash SIGKILLs its worker every time, 4 workers, other URLs under load",
        &format!(
            "{deaths} deaths, then quarantined ({}); /crash answered {:?}; other URLs {others_ok} of {others_total} 200",
            if quarantine_line.contains("killed 3 workers in 3 requests") {
                "3 deaths in 3 requests"
            } else {
                "not as expected"
            },
            &statuses[..statuses.len().min(4)]
        ),
        "quarantined after 3 deaths; other URLs unaffected",
        pass,
    );
    assert!(
        pass,
        "statuses {statuses:?}, deaths {deaths}, others {others_ok}/{others_total} {:?}\n{log}",
        others.examples.lock().unwrap()
    );
}
