//! Supervision with real worker processes: deaths explained, retries, quarantine, crash loops, timeouts,
//! recycling and reload.

mod common;

use std::process::Command;
use std::thread;
use std::time::{Duration, Instant};

use common::*;

/// The OOM test makes the machine's OOM kill counter grow, which could explain the SIGKILLs of the tests
/// that kill workers themselves while it runs: those take this for reading, it takes it for writing.
static OOM_COUNTER: std::sync::RwLock<()> = std::sync::RwLock::new(());

fn kills_workers() -> std::sync::RwLockReadGuard<'static, ()> {
    OOM_COUNTER.read().unwrap_or_else(|e| e.into_inner())
}

fn crashy(args: &[&str], pid_dir: &std::path::Path) -> Anteroom {
    require("python3");
    let env = format!("PID_DIR={}", pid_dir.display());
    let mut all: Vec<&str> = vec!["--env", &env];
    all.extend_from_slice(args);
    all.extend_from_slice(&["--", "python3", "tests/fixtures/crashy.py"]);
    Anteroom::start(&all)
}

/// Starts `req` in a thread, waits until the worker holding it wrote its pid, and SIGKILLs that worker.
fn kill_worker_mid_request(
    a: &Anteroom,
    req: &'static [u8],
    pid_file: std::path::PathBuf,
) -> Response {
    let addr = a.addr;
    let t = thread::spawn(move || request(addr, req).unwrap());
    wait_until(
        "the worker to take the request",
        Duration::from_secs(10),
        || pid_file.exists(),
    );
    thread::sleep(Duration::from_millis(50));
    let pid: u32 = std::fs::read_to_string(&pid_file)
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    std::fs::remove_file(&pid_file).unwrap();
    signal(pid, 9);
    t.join().unwrap()
}

#[test]
fn a_get_whose_worker_is_killed_is_retried_and_the_death_names_it() {
    let _oom = kills_workers();
    let dir = tempfile::tempdir().unwrap();
    let a = crashy(&["--workers", "2"], dir.path());
    let r = kill_worker_mid_request(
        &a,
        b"GET /slow?ms=1500&tag=x HTTP/1.1\r\nHost: t\r\nX-Request-Id: get-1\r\nConnection: close\r\n\r\n",
        dir.path().join("x"),
    );
    assert_eq!(r.status, 200, "{}\n{}", r.text(), a.log_text());
    assert!(r.text().contains("/slow"), "{}", r.text());
    let log = a.log_text();
    let death = log
        .lines()
        .find(|l| l.contains("ERROR") && l.contains(" worker died "))
        .unwrap_or_else(|| panic!("no death event:\n{log}"));
    for needle in [
        "SIGKILL",
        "get-1",
        "/slow?ms=1500&tag=x",
        "request_sent_bytes",
        "served=",
    ] {
        assert!(death.contains(needle), "{needle} missing from: {death}");
    }
    assert!(log.contains("retrying it on another worker"), "{log}");
}

#[test]
fn a_post_whose_worker_is_killed_gets_a_502_naming_its_request() {
    let _oom = kills_workers();
    let dir = tempfile::tempdir().unwrap();
    let a = crashy(&["--workers", "2"], dir.path());
    let r = kill_worker_mid_request(
        &a,
        b"POST /slow?ms=1500&tag=p HTTP/1.1\r\nHost: t\r\nX-Request-Id: post-1\r\nContent-Length: 2\r\nConnection: close\r\n\r\nhi",
        dir.path().join("p"),
    );
    assert_eq!(r.status, 502, "{}", r.text());
    assert!(r.text().contains("post-1"), "{}", r.text());
    assert_eq!(r.header("x-request-id").as_deref(), Some("post-1"));
}

#[test]
fn a_poison_url_is_quarantined_while_others_are_served() {
    let _oom = kills_workers();
    let dir = tempfile::tempdir().unwrap();
    let a = crashy(&["--workers", "3", "--quarantine-after", "3"], dir.path());
    // Killed the worker, was retried, killed another: a poison request.
    let r = a.get("/crash");
    assert_eq!(r.status, 502, "{}", r.text());
    assert!(r.text().contains("killed two workers"), "{}", r.text());
    assert_eq!(a.get("/fine").status, 200);
    // The third death puts GET /crash in quarantine.
    let r = a.get("/crash");
    assert_eq!(r.status, 502, "{}", r.text());
    let r = a.get("/crash?other=query");
    assert_eq!(r.status, 503, "{}", r.text());
    let retry: u64 = r.header("retry-after").unwrap().parse().unwrap();
    assert!(retry > 60, "retry after the cool-down, got {retry}");
    for _ in 0..5 {
        assert_eq!(a.get("/fine").status, 200);
    }
    let log = a.log_text();
    assert_eq!(
        log.matches("refusing it with 503").count(),
        1,
        "quarantine is logged once:\n{log}"
    );
}

/// User and system CPU time of a process, from /proc.
fn cpu_time(pid: u32) -> Duration {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    let rest = stat.rsplit_once(')').unwrap().1;
    let f: Vec<&str> = rest.split_whitespace().collect();
    // utime and stime are fields 14 and 15 of stat; 12 and 13 after the command name.
    let ticks: u64 = f[11].parse::<u64>().unwrap() + f[12].parse::<u64>().unwrap();
    Duration::from_millis(ticks * 10)
}

#[test]
fn a_worker_that_cannot_start_is_contained() {
    // Exits at once, every time: the crash loop people write external monitors for.
    let a = Anteroom::start_env(&["--workers", "4", "--", "false"], &[], None);
    let pid = a.pid();
    thread::sleep(Duration::from_secs(1));
    let cpu_before = cpu_time(pid);
    let t = Instant::now();
    thread::sleep(Duration::from_secs(6));
    let used = cpu_time(pid) - cpu_before;
    let share = used.as_secs_f64() / t.elapsed().as_secs_f64();
    assert!(
        share < 0.05,
        "anteroom used {:.1}% CPU during the crash loop",
        share * 100.0
    );
    // Every slot is failing: requests are refused at once instead of waiting forever.
    let r = a.get("/");
    assert_eq!(r.status, 503, "{}", r.text());
    assert!(r.header("retry-after").is_some());
    let log = a.log_text();
    let lines = log.lines().count();
    assert!(
        lines <= 12,
        "{lines} log lines in 7 s of crash loop:\n{log}"
    );
    assert!(log.contains("worker failed at start"), "{log}");
    assert!(
        log.contains("restart_in_ms="),
        "the backoff shows in the log: {log}"
    );
    assert!(log.contains("every worker slot is failing"), "{log}");
}

#[test]
fn crash_exit_ends_anteroom_with_its_own_code() {
    let mut a = Anteroom::start_env(
        &["--workers", "2", "--crash-exit", "3/60", "--", "false"],
        &[],
        None,
    );
    let mut child = a.child.take().unwrap();
    let status = wait_timeout(&mut child, Duration::from_secs(20)).expect("anteroom exits");
    assert_eq!(status.code(), Some(3), "{}", a.log_text());
}

#[test]
fn a_request_over_the_timeout_gets_504_and_its_worker_is_replaced() {
    let a = Anteroom::start(&[
        "--workers",
        "1",
        "--request-timeout",
        "1",
        "--kill-grace",
        "1",
    ]);
    let started = Instant::now();
    let r = a.get("/sleep?ms=5000");
    assert_eq!(r.status, 504, "{}", r.text());
    assert!(started.elapsed() < Duration::from_secs(4));
    wait_until("a replacement worker", Duration::from_secs(10), || {
        a.try_get("/sleep?ms=1")
            .map(|r| r.status == 200)
            .unwrap_or(false)
    });
    let log = a.log_text();
    assert!(log.contains("worker stopped: request timeout"), "{log}");
    assert!(log.contains("/sleep?ms=5000"), "{log}");
}

/// oha's status-code counts and connection errors for a load against `url`.
fn load(url: &str, n: u32, c: u32, during: impl FnOnce()) -> (serde_json::Value, String) {
    require("oha");
    let child = Command::new("oha")
        .args([
            "-n",
            &n.to_string(),
            "-c",
            &c.to_string(),
            "--no-tui",
            "--output-format",
            "json",
            url,
        ])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    during();
    let out = child.wait_with_output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let v: serde_json::Value =
        serde_json::from_str(&text).unwrap_or_else(|e| panic!("oha output: {e}: {text}"));
    (v, text)
}

fn assert_all_200(v: &serde_json::Value, n: u64, raw: &str) {
    let codes = &v["statusCodeDistribution"];
    assert_eq!(codes["200"].as_u64(), Some(n), "{raw}");
    let errors = v["errorDistribution"].as_object().map_or(0, |e| e.len());
    assert_eq!(errors, 0, "{raw}");
}

#[test]
fn recycling_under_load_fails_nothing() {
    let a = Anteroom::start(&[
        "--workers",
        "3",
        "--max-requests",
        "20",
        "--max-requests-jitter",
        "5",
    ]);
    let url = format!("http://{}/sleep?ms=2", a.addr);
    let (v, raw) = load(&url, 300, 8, || {});
    assert_all_200(&v, 300, &raw);
    let log = a.log_text();
    assert!(log.matches("retiring worker: served").count() >= 6, "{log}");
}

#[test]
fn a_reload_under_load_loses_nothing() {
    let a = Anteroom::start(&["--workers", "3"]);
    let url = format!("http://{}/sleep?ms=20", a.addr);
    let pid = a.pid();
    let before = children(pid);
    let (v, raw) = load(&url, 600, 8, || {
        thread::sleep(Duration::from_millis(700));
        signal(pid, 1);
    });
    assert_all_200(&v, 600, &raw);
    wait_until(
        "the old generation to retire",
        Duration::from_secs(10),
        || before.iter().all(|w| !alive(*w)),
    );
    assert_eq!(children(pid).len(), 3, "{}", a.log_text());
    assert!(a.log_text().contains("reload: a new worker took over"));
}

#[test]
fn a_dynamic_pool_grows_under_load_and_shrinks_when_idle() {
    let a = Anteroom::start(&["--workers", "1:4", "--idle-timeout", "1"]);
    let pid = a.pid();
    assert_eq!(children(pid).len(), 1);
    let addr = a.addr;
    let load: Vec<_> = (0..12)
        .map(|_| thread::spawn(move || get(addr, "/sleep?ms=400")))
        .collect();
    let mut most = 0;
    let t = Instant::now();
    while t.elapsed() < Duration::from_secs(3) {
        most = most.max(children(pid).len());
        thread::sleep(Duration::from_millis(50));
    }
    for l in load {
        assert_eq!(l.join().unwrap().status, 200);
    }
    assert!(most >= 3, "grew to only {most} workers\n{}", a.log_text());
    assert!(most <= 4, "grew past MAX: {most}");
    wait_until(
        "the pool to shrink back to MIN",
        Duration::from_secs(15),
        || children(pid).len() == 1,
    );
    assert!(a.log_text().contains("leaving the pool"));
    assert_eq!(a.get("/sleep?ms=1").status, 200);
}

#[test]
fn a_worker_gets_traffic_only_once_ready() {
    // The probe answers 200: ready, serving.
    let a = Anteroom::start(&["--workers", "1", "--ready-probe", "/sleep?ms=1"]);
    assert_eq!(a.get("/env").status, 200);
    drop(a);
    // The probe answers 404: never ready, a failed start, and requests are refused rather than queued.
    let a = Anteroom::start_env(
        &[
            "--workers",
            "1",
            "--ready-probe",
            "/nope",
            "--spawn-timeout",
            "2",
        ],
        &[],
        None,
    );
    wait_until("the failed start", Duration::from_secs(10), || {
        a.log_text().contains("worker failed at start")
    });
    assert!(
        a.log_text().contains("ready probe /nope answered 404"),
        "{}",
        a.log_text()
    );
    assert_eq!(a.get("/env").status, 503);
}

#[test]
fn a_worker_that_never_accepts_is_killed_after_the_spawn_timeout() {
    // `sleep` holds the socket on fd 0 and never accepts.
    let a = Anteroom::start_env(
        &[
            "--workers",
            "1",
            "--spawn-timeout",
            "1",
            "--",
            "sleep",
            "60",
        ],
        &[],
        None,
    );
    wait_until("the spawn timeout", Duration::from_secs(10), || {
        a.log_text().contains("not ready within --spawn-timeout")
    });
    assert!(
        a.log_text().contains("signal 15 (SIGTERM)"),
        "{}",
        a.log_text()
    );
}

#[test]
fn recycling_on_memory_fails_nothing() {
    // Every demo worker is over 1 MiB: each is replaced after every request, and no request notices.
    let a = Anteroom::start(&["--workers", "2", "--max-rss", "1"]);
    let url = format!("http://{}/sleep?ms=1", a.addr);
    let (v, raw) = load(&url, 60, 4, || {});
    assert_all_200(&v, 60, &raw);
    assert!(a.log_text().contains("over --max-rss"), "{}", a.log_text());
}

/// A child memory cgroup of the test's own, with a memory limit; removed on drop.
struct MemCgroup(std::path::PathBuf);

impl MemCgroup {
    /// cgroup v1 (the memory hierarchy) or v2 (the unified one, with the memory controller enabled).
    fn new(limit: u64) -> MemCgroup {
        let own = std::fs::read_to_string("/proc/self/cgroup").unwrap();
        let name = format!("anteroom-oom-test-{}", std::process::id());
        for l in own.lines() {
            let mut f = l.splitn(3, ':');
            let (_, ctrl, path) = (f.next().unwrap(), f.next().unwrap(), f.next().unwrap());
            let path = path.trim_start_matches('/');
            let (dir, files): (_, &[&str]) = if ctrl.split(',').any(|c| c == "memory") {
                (
                    std::path::Path::new("/sys/fs/cgroup/memory").join(path),
                    &["memory.limit_in_bytes", "memory.memsw.limit_in_bytes"],
                )
            } else if ctrl.is_empty() {
                let unified = ["/sys/fs/cgroup", "/sys/fs/cgroup/unified"]
                    .into_iter()
                    .find(|m| std::path::Path::new(m).join("cgroup.controllers").exists());
                let Some(m) = unified else { continue };
                let dir = std::path::Path::new(m).join(path);
                let ctl =
                    std::fs::read_to_string(dir.join("cgroup.subtree_control")).unwrap_or_default();
                if !ctl.split_whitespace().any(|c| c == "memory") {
                    continue;
                }
                (dir, &["memory.max", "memory.swap.max"])
            } else {
                continue;
            };
            let cg = dir.join(&name);
            if std::fs::create_dir(&cg).is_err() {
                continue;
            }
            for f in files {
                let _ = std::fs::write(cg.join(f), limit.to_string());
            }
            return MemCgroup(cg);
        }
        panic!("no writable memory cgroup to run the OOM test in (needs root and cgroup v1 memory or v2 with memory enabled)");
    }
}

impl Drop for MemCgroup {
    fn drop(&mut self) {
        for _ in 0..50 {
            if std::fs::remove_dir(&self.0).is_ok() {
                return;
            }
            thread::sleep(Duration::from_millis(100));
        }
    }
}

#[test]
fn deaths_the_oom_killer_explains_are_reported_as_such_and_never_quarantine() {
    let _oom = OOM_COUNTER.write().unwrap_or_else(|e| e.into_inner());
    let cg = MemCgroup::new(96 << 20);
    let env = format!("OOM_CGROUP={}", cg.0.display());
    let a = Anteroom::start(&[
        "--workers",
        "2",
        "--quarantine-after",
        "3",
        "--env",
        &env,
        "--",
        "python3",
        "tests/fixtures/supervised_app.py",
    ]);
    // Each request is OOM-killed, retried, OOM-killed again: 502. Three of them are six deaths, which
    // would quarantine a URL were they the request's doing.
    for _ in 0..4 {
        let r = a.get("/oom");
        assert_eq!(r.status, 502, "{}\n{}", r.text(), a.log_text());
    }
    assert_eq!(a.get("/fine").status, 200);
    let log = a.log_text();
    let oom_deaths = log
        .lines()
        .filter(|l| l.contains("worker killed by the kernel's OOM killer"))
        .count();
    assert!(oom_deaths >= 6, "{oom_deaths} OOM deaths:\n{log}");
    assert!(
        log.contains("not counted: killed by the kernel's OOM killer"),
        "{log}"
    );
    assert!(!log.contains("refusing it with 503"), "{log}");
}
