//! Connections bounded, and the service stays up at the limit (issue 9, part 4), plus the small fixes of
//! part 6 that go with it: /status without query strings, stale worker socket directories.
//!
//! The flood case (`silent_flood_at_the_fd_limit`) is a fault case of the benchmark: its short form runs
//! anteroom with RLIMIT_NOFILE lowered to 1024, so that a few thousand silent connections reach the limit
//! in a second; `ANTEROOM_FAULTS=long` runs it with the default limit (about 20,000 connections, as in the
//! issue) for 60 s. It prints one `FAULT-RESULT {json}` line. Latency is only asserted in the long form
//! (p99 < 1 s, the issue's target): the short form runs on a shared machine and asserts that every request
//! was answered 200, none hung.
//!
//! Everything runs against the real binary and its built-in demo app (FastCGI workers).

mod common;

use std::collections::VecDeque;
use std::io::Write;
use std::net::{SocketAddr, TcpStream};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use common::{
    alive, children, fault_result, free_port, long_form, metric, read_response, read_some, signal,
    wait_timeout, wait_until, BIN,
};

/// anteroom with its admin listener, optionally with RLIMIT_NOFILE set (soft and hard) before exec.
struct Server {
    child: Option<Child>,
    port: u16,
    admin: u16,
    log: PathBuf,
    _dir: tempfile::TempDir,
}

impl Server {
    fn start(nofile: Option<u64>, args: &[&str], env: &[(&str, &str)]) -> Server {
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("anteroom.log");
        let port = free_port();
        let admin = free_port();
        let mut cmd = command(nofile);
        cmd.arg("--listen")
            .arg(format!("127.0.0.1:{port}"))
            .arg("--admin")
            .arg(format!("127.0.0.1:{admin}"))
            .args(args)
            .envs(env.iter().copied())
            .env("ANTEROOM_LOG", "info")
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap());
        let child = cmd.spawn().expect("anteroom starts");
        let s = Server {
            child: Some(child),
            port,
            admin,
            log,
            _dir: dir,
        };
        let deadline = Instant::now() + Duration::from_secs(30);
        while !s.get("/").is_ok_and(|r| r.status == 200) {
            assert!(
                Instant::now() < deadline,
                "anteroom did not become ready; log:\n{}",
                s.log_text()
            );
            thread::sleep(Duration::from_millis(50));
        }
        s
    }

    fn addr(&self) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], self.port))
    }

    fn admin_addr(&self) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], self.admin))
    }

    fn pid(&self) -> u32 {
        self.child.as_ref().unwrap().id()
    }

    fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    fn get(&self, path: &str) -> std::io::Result<common::Response> {
        get_timeout(self.addr(), path, Duration::from_secs(10))
    }

    fn admin_get(&self, path: &str) -> std::io::Result<common::Response> {
        get_timeout(self.admin_addr(), path, Duration::from_secs(10))
    }

    fn metrics(&self) -> String {
        self.admin_get("/metrics")
            .map(|r| r.text())
            .unwrap_or_default()
    }

    fn status(&self) -> serde_json::Value {
        let r = self.admin_get("/status").expect("GET /status");
        serde_json::from_slice(&r.body).expect("/status is JSON")
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            signal(c.id(), 15);
            if wait_timeout(&mut c, Duration::from_secs(15)).is_none() {
                let _ = c.kill();
                let _ = c.wait();
            }
        }
    }
}

fn command(nofile: Option<u64>) -> Command {
    let mut cmd = Command::new(BIN);
    if let Some(n) = nofile {
        // SAFETY: setrlimit is async-signal-safe; the struct lives on the child's stack.
        unsafe {
            cmd.pre_exec(move || {
                let l = libc::rlimit {
                    rlim_cur: n,
                    rlim_max: n,
                };
                if libc::setrlimit(libc::RLIMIT_NOFILE, &l) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
    }
    cmd
}

fn get_timeout(addr: SocketAddr, path: &str, limit: Duration) -> std::io::Result<common::Response> {
    let mut s = TcpStream::connect_timeout(&addr, limit)?;
    s.set_read_timeout(Some(limit))?;
    s.set_write_timeout(Some(limit))?;
    s.write_all(format!("GET {path} HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n").as_bytes())?;
    read_response(&mut s)
}

/// Server-side TCP sockets of 127.0.0.1:`port` that are open (ESTABLISHED or CLOSE_WAIT), from
/// /proc/net/tcp: what anteroom holds, plus any the kernel has not handed to accept() yet. (The flood's
/// own sockets are bound to other loopback addresses, so an ephemeral port equal to `port` is not taken.)
fn kernel_conns(port: u16) -> usize {
    let text = std::fs::read_to_string("/proc/net/tcp").unwrap_or_default();
    let want = format!("0100007F:{port:04X}");
    text.lines()
        .skip(1)
        .filter(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            f.len() > 3 && f[1] == want && (f[3] == "01" || f[3] == "08")
        })
        .count()
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let i = ((sorted.len() as f64 * p).ceil() as usize).clamp(1, sorted.len()) - 1;
    sorted[i]
}

/// Raises this process's own open-files limit (root may raise the hard one): the long flood holds more
/// connections than the default 20,000 allows.
fn raise_own_nofile(want: u64) -> u64 {
    let mut l = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit with structs we own.
    unsafe {
        libc::getrlimit(libc::RLIMIT_NOFILE, &mut l);
        if l.rlim_cur < want {
            let n = libc::rlimit {
                rlim_cur: want,
                rlim_max: want.max(l.rlim_max),
            };
            if libc::setrlimit(libc::RLIMIT_NOFILE, &n) == 0 {
                return want;
            }
            let n = libc::rlimit {
                rlim_cur: l.rlim_max,
                rlim_max: l.rlim_max,
            };
            if libc::setrlimit(libc::RLIMIT_NOFILE, &n) == 0 {
                return l.rlim_max;
            }
        }
        l.rlim_cur
    }
}

/// Silent connections, opened from several loopback addresses so that the ports of one never run out.
struct Flood {
    to: SocketAddr,
    held: VecDeque<TcpStream>,
    opened: u64,
    failed: u64,
    slow: u64,
    next: u8,
}

impl Flood {
    fn open_one(&mut self) {
        self.next = self.next % 8 + 1;
        let from = SocketAddr::from(([127, 0, 0, 1 + self.next], 0));
        let s = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
        let started = Instant::now();
        let r = s
            .bind(&from.into())
            .and_then(|()| s.connect_timeout(&self.to.into(), Duration::from_secs(3)));
        // A connect that takes a second or more waited for a SYN retransmit: the accept queue was full.
        if started.elapsed() >= Duration::from_millis(900) {
            self.slow += 1;
        }
        match r {
            Ok(()) => {
                self.opened += 1;
                self.held.push_back(s.into());
            }
            Err(_) => self.failed += 1,
        }
    }
}

/// Another process holding silent connections (python3, as the test peers need it anyway), for when this
/// one may not hold enough descriptors; they close when it is dropped.
struct Helper {
    child: Child,
    held: usize,
}

const HOLD_PY: &str = r#"
import socket, sys
host, port, n = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
held = []
for i in range(n):
    s = socket.socket()
    s.bind(("127.0.0.%d" % (20 + i % 8), 0))
    s.connect((host, port))
    held.append(s)
print(len(held), flush=True)
sys.stdin.read()
"#;

impl Helper {
    fn hold(to: SocketAddr, n: usize) -> Helper {
        common::require("python3");
        let mut child = Command::new("python3")
            .args([
                "-c",
                HOLD_PY,
                &to.ip().to_string(),
                &to.port().to_string(),
                &n.to_string(),
            ])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .expect("python3 runs");
        let mut line = String::new();
        std::io::BufRead::read_line(
            &mut std::io::BufReader::new(child.stdout.as_mut().unwrap()),
            &mut line,
        )
        .unwrap();
        let held = line.trim().parse().unwrap_or(0);
        assert_eq!(held, n, "the helper could not open its connections");
        Helper { child, held }
    }
}

impl Drop for Helper {
    fn drop(&mut self) {
        drop(self.child.stdin.take());
        if wait_timeout(&mut self.child, Duration::from_secs(10)).is_none() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

#[derive(Default)]
struct Probes {
    ok: Vec<Duration>,
    failed: Vec<String>,
}

/// Runs `f` every `every` until `stop`, recording what it says.
fn prober(
    stop: Arc<AtomicBool>,
    every: Duration,
    out: Arc<Mutex<Probes>>,
    f: impl Fn() -> Result<(), String> + Send + 'static,
) -> thread::JoinHandle<()> {
    thread::spawn(move || {
        while !stop.load(Ordering::Relaxed) {
            let t = Instant::now();
            let r = f();
            let took = t.elapsed();
            {
                let mut p = out.lock().unwrap();
                match r {
                    Ok(()) => p.ok.push(took),
                    Err(e) => p.failed.push(e),
                }
            }
            thread::sleep(every.saturating_sub(took));
        }
    })
}

#[allow(
    clippy::too_many_lines,
    clippy::cognitive_complexity,
    reason = "one fault scenario (flood, churn, probes, measurements), read top to bottom"
)]
#[test]
fn silent_flood_at_the_fd_limit() {
    let long = long_form();
    let (nofile, churn_secs, churn_per_s) = if long {
        (None, 60u64, 1000u64)
    } else {
        (Some(1024u64), 6, 500)
    };
    // Silent connections are kept for the whole run (no head deadline): the flood only grows.
    let server = Arc::new(Server::start(
        nofile,
        &["--workers", "2", "--header-timeout", "3600"],
        &[],
    ));
    let m = server.metrics();
    let limit = metric(&m, "anteroom_client_connections_limit").expect("the limit gauge") as usize;
    assert!(limit > 100, "limit {limit}");
    // Past the limit by a quarter: the oldest silent ones must make room for the newest.
    // This process may hold no more descriptors than anteroom without CAP_SYS_RESOURCE (20,000 for both
    // in the long form): a helper process holds the rest.
    let target = limit + limit / 4 + 200;
    let own = raise_own_nofile(target as u64 + 2000) as usize;
    let mine = target.min(own.saturating_sub(200));

    let stop = Arc::new(AtomicBool::new(false));
    let ok_probes = Arc::new(Mutex::new(Probes::default()));
    let live_probes = Arc::new(Mutex::new(Probes::default()));
    let s1 = server.clone();
    let probe_ok = prober(
        stop.clone(),
        Duration::from_millis(50),
        ok_probes.clone(),
        move || match s1.get("/") {
            Ok(r) if r.status == 200 => Ok(()),
            Ok(r) => Err(format!("status {}", r.status)),
            Err(e) => Err(e.to_string()),
        },
    );
    let s2 = server.clone();
    let probe_live = prober(
        stop.clone(),
        Duration::from_millis(100),
        live_probes.clone(),
        move || match s2.admin_get("/health/live") {
            Ok(r) if r.status == 200 => Ok(()),
            Ok(r) => Err(format!("status {}", r.status)),
            Err(e) => Err(e.to_string()),
        },
    );
    // The gauge during the flood: it must never pass the limit by more than the acceptor's slack.
    let gauge_max = Arc::new(Mutex::new(0f64));
    let s3 = server.clone();
    let (stop3, gmax) = (stop.clone(), gauge_max.clone());
    let scraper = thread::spawn(move || {
        while !stop3.load(Ordering::Relaxed) {
            if let Some(g) = metric(&s3.metrics(), "anteroom_client_connections") {
                let mut m = gmax.lock().unwrap();
                *m = m.max(g);
            }
            thread::sleep(Duration::from_millis(250));
        }
    });

    // Phase 1: to the limit and past it, as fast as one thread can connect.
    let mut flood = Flood {
        to: server.addr(),
        held: VecDeque::new(),
        opened: 0,
        failed: 0,
        slow: 0,
        next: 0,
    };
    let t0 = Instant::now();
    while flood.held.len() < mine && t0.elapsed() < Duration::from_secs(120) {
        flood.open_one();
    }
    let helper = (target > mine).then(|| Helper::hold(server.addr(), target - mine));
    let fill = t0.elapsed();

    // Phase 2: churn (new silent connections replace the oldest), and one worker is SIGKILLed meanwhile.
    let kill_at = Duration::from_secs(churn_secs * 3 / 10);
    let mut killed: Option<(u32, Instant)> = None;
    let mut respawned: Option<Duration> = None;
    let t1 = Instant::now();
    let mut due = 0f64;
    while t1.elapsed() < Duration::from_secs(churn_secs) {
        due += churn_per_s as f64 / 100.0;
        while due >= 1.0 {
            flood.open_one();
            while flood.held.len() > mine {
                flood.held.pop_front();
            }
            due -= 1.0;
        }
        if killed.is_none() && t1.elapsed() >= kill_at {
            let workers = children(server.pid());
            let victim = *workers.first().expect("a worker to kill");
            signal(victim, 9);
            killed = Some((victim, Instant::now()));
        }
        if let (Some((victim, at)), None) = (killed, respawned) {
            if !alive(victim) && worker_pids_up(&server, victim) >= 2 {
                respawned = Some(at.elapsed());
            }
        }
        thread::sleep(Duration::from_millis(10));
    }
    if let Some((victim, at)) = killed {
        let deadline = Instant::now() + Duration::from_secs(20);
        while respawned.is_none() && Instant::now() < deadline {
            if !alive(victim) && worker_pids_up(&server, victim) >= 2 {
                respawned = Some(at.elapsed());
            }
            thread::sleep(Duration::from_millis(50));
        }
    }
    stop.store(true, Ordering::Relaxed);
    probe_ok.join().unwrap();
    probe_live.join().unwrap();
    scraper.join().unwrap();

    // Phase 3: at rest, with the flood still held, the gauge is what the kernel says anteroom holds.
    let mut at_rest = (f64::NAN, 0usize);
    let deadline = Instant::now() + Duration::from_secs(15);
    while Instant::now() < deadline {
        let g = metric(&server.metrics(), "anteroom_client_connections").unwrap_or(f64::NAN);
        let k = kernel_conns(server.port);
        at_rest = (g, k);
        if g as usize == k {
            break;
        }
        thread::sleep(Duration::from_millis(200));
    }
    let m = server.metrics();
    let closed_idle = metric(&m, "anteroom_client_connections_idle_closed_total").unwrap_or(0.0);
    let refused = metric(&m, "anteroom_client_connections_refused_total").unwrap_or(0.0);
    let listen_queue = metric(&m, "anteroom_listen_queue").unwrap_or(0.0);
    let rss_mib = rss_kib(server.pid()) as f64 / 1024.0;

    // Phase 4: the flood leaves; the gauge goes back to zero.
    let held = flood.held.len() + helper.as_ref().map_or(0, |h| h.held);
    flood.held.clear();
    drop(helper);
    let mut after = f64::NAN;
    let deadline = Instant::now() + Duration::from_secs(15);
    while Instant::now() < deadline {
        after = metric(&server.metrics(), "anteroom_client_connections").unwrap_or(f64::NAN);
        if after == 0.0 {
            break;
        }
        thread::sleep(Duration::from_millis(100));
    }

    let log = server.log_text();
    let fd_errors = log
        .lines()
        .filter(|l| {
            l.contains("Too many open files")
                || l.contains("accept failed")
                || l.contains("cannot make the worker's socket")
        })
        .count();
    let ok = ok_probes.lock().unwrap();
    let live = live_probes.lock().unwrap();
    let mut lat = ok.ok.clone();
    lat.sort();
    let p99 = percentile(&lat, 0.99);
    let p50 = percentile(&lat, 0.50);
    let max = lat.last().copied().unwrap_or_default();
    let gauge_max = *gauge_max.lock().unwrap();

    let probes_ok = ok.failed.is_empty() && !ok.ok.is_empty();
    let live_ok = live.failed.is_empty() && !live.ok.is_empty();
    let latency_ok = p99 < Duration::from_secs(1);
    let gauge_ok = gauge_max <= (limit + 64) as f64
        && gauge_max >= (limit / 2) as f64
        && at_rest.0 as usize == at_rest.1
        && after == 0.0;
    let pass = probes_ok
        && live_ok
        && respawned.is_some()
        && gauge_ok
        && closed_idle > 0.0
        && refused == 0.0
        && flood.failed == 0
        && flood.slow == 0
        && fd_errors == 0
        && (latency_ok || !long);
    let measured = format!(
        "{held} silent connections held ({} opened in all, limit {limit}, filled in {:.1} s, {} connects \
         waited on a full accept queue, {} failed), churn {churn_per_s}/s for {churn_secs} s: \
         /ok {}/{} 200, p50 {:.1} ms, p99 {:.1} ms, max {:.1} ms; /health/live {}/{} 200; worker respawned \
         in {}; gauge max {gauge_max} (limit {limit}), {} at rest = {} open in the kernel, {after} after; \
         {closed_idle} idle closed, {refused} refused; {fd_errors} fd errors logged; listen queue \
         {listen_queue} at rest; anteroom RSS {rss_mib:.0} MiB at rest",
        flood.opened,
        fill.as_secs_f64(),
        flood.slow,
        flood.failed,
        ok.ok.len(),
        ok.ok.len() + ok.failed.len(),
        p50.as_secs_f64() * 1e3,
        p99.as_secs_f64() * 1e3,
        max.as_secs_f64() * 1e3,
        live.ok.len(),
        live.ok.len() + live.failed.len(),
        respawned.map_or("never".to_string(), |d| format!("{:.2} s", d.as_secs_f64())),
        at_rest.0,
        at_rest.1,
    );
    fault_result(
        "conn-flood",
        &format!(
            "Silent-connection flood past the fd limit (RLIMIT_NOFILE {}), 2 demo workers, one SIGKILLed mid-flood",
            server.status()["connections"]["nofile"]
        ),
        &measured,
        "/ok p99 < 1 s and /health/live 200 throughout; workers respawn; gauge correct",
        pass && latency_ok,
    );
    assert!(
        probes_ok,
        "/ok failed: {:?}\n{measured}",
        &ok.failed[..ok.failed.len().min(10)]
    );
    assert!(
        live_ok,
        "/health/live failed: {:?}\n{measured}",
        &live.failed[..live.failed.len().min(10)]
    );
    assert!(
        respawned.is_some(),
        "the killed worker was not replaced\n{measured}"
    );
    assert!(gauge_ok, "connection gauge wrong\n{measured}");
    assert!(
        closed_idle > 0.0,
        "the flood never reached the limit\n{measured}"
    );
    assert_eq!(
        refused, 0.0,
        "new clients refused while idle connections could close\n{measured}"
    );
    assert!(
        flood.failed == 0 && flood.slow == 0,
        "connects failed or waited on a full accept queue\n{measured}"
    );
    assert_eq!(
        fd_errors, 0,
        "descriptor errors in the log\n{measured}\n{log}"
    );
    if long {
        assert!(latency_ok, "/ok p99 above 1 s\n{measured}");
    }
}

fn rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap_or(0)
}

/// Worker pids up (idle or busy) on the scoreboard, other than `gone`.
fn worker_pids_up(server: &Server, gone: u32) -> usize {
    let Ok(r) = server.admin_get("/status") else {
        return 0;
    };
    let Ok(v) = serde_json::from_slice::<serde_json::Value>(&r.body) else {
        return 0;
    };
    v["workers"]
        .as_array()
        .map(|ws| {
            ws.iter()
                .filter(|w| {
                    matches!(w["state"].as_str(), Some("idle" | "busy"))
                        && w["pid"].as_u64() != Some(u64::from(gone))
                })
                .count()
        })
        .unwrap_or(0)
}

/// Whether the server has closed `s` (EOF or reset) within `wait`.
fn closed_by_server(s: &mut TcpStream, wait: Duration) -> bool {
    s.set_read_timeout(Some(wait)).unwrap();
    let mut b = [0u8; 64];
    match read_some(s, &mut b) {
        Ok(0) => true,
        Ok(_) => false,
        Err(e) => !matches!(
            e.kind(),
            std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
        ),
    }
}

#[test]
fn oldest_idle_connection_is_closed_first() {
    let server = Server::start(None, &["--workers", "1", "--max-connections", "3"], &[]);
    let connect = || TcpStream::connect(server.addr()).unwrap();
    let mut a = connect();
    thread::sleep(Duration::from_millis(50));
    let mut b = connect();
    thread::sleep(Duration::from_millis(50));
    // A keep-alive client between requests: idle too, and the newest.
    let mut c = connect();
    c.write_all(b"GET / HTTP/1.1\r\nHost: t\r\n\r\n").unwrap();
    assert_eq!(read_response(&mut c).unwrap().status, 200);
    thread::sleep(Duration::from_millis(50));

    let mut d = connect();
    assert!(
        closed_by_server(&mut a, Duration::from_secs(5)),
        "the oldest (a) closed for d"
    );
    assert!(
        !closed_by_server(&mut b, Duration::from_millis(300)),
        "b stays"
    );
    let _e = connect();
    assert!(closed_by_server(&mut b, Duration::from_secs(5)), "then b");
    assert!(
        !closed_by_server(&mut c, Duration::from_millis(300)),
        "c stays"
    );
    let _f = connect();
    assert!(
        closed_by_server(&mut c, Duration::from_secs(5)),
        "then the keep-alive one"
    );
    // d, silent so far, is served.
    d.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    d.write_all(b"GET / HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n")
        .unwrap();
    assert_eq!(read_response(&mut d).unwrap().status, 200);
    let m = server.metrics();
    assert_eq!(
        metric(&m, "anteroom_client_connections_idle_closed_total"),
        Some(3.0),
        "{m}"
    );
    assert_eq!(
        metric(&m, "anteroom_client_connections_limit"),
        Some(3.0),
        "{m}"
    );
}

/// Descriptors for temp files are taken when a file is opened, not set aside for every request: 450
/// keep-alive clients that send a GET at the same moment, near the open-files limit, are all served and none
/// is closed. Reserving two descriptors per request in progress closed a third of them, each with its request
/// unread (the scale benchmark, 10,000 connections with 20,000 descriptors).
#[test]
fn clients_sending_at_once_near_the_fd_limit_are_all_served() {
    const CLIENTS: usize = 450;
    raise_own_nofile(CLIENTS as u64 + 200);
    // 700 descriptors: about 510 for clients once workers, listeners and the admin listener have theirs.
    let server = Server::start(Some(700), &["--workers", "2", "--max-queue", "1000"], &[]);
    let mut conns: Vec<TcpStream> = (0..CLIENTS)
        .map(|_| TcpStream::connect(server.addr()).unwrap())
        .collect();
    // Each connection has served a request and is idle, kept alive.
    for c in &mut conns {
        c.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
        c.write_all(b"GET / HTTP/1.1\r\nHost: t\r\n\r\n").unwrap();
        assert_eq!(read_response(c).unwrap().status, 200);
    }
    for c in &mut conns {
        c.write_all(b"GET /sleep?ms=1 HTTP/1.1\r\nHost: t\r\n\r\n")
            .unwrap();
    }
    let served = conns
        .iter_mut()
        .map(read_response)
        .filter(|r| r.as_ref().is_ok_and(|r| r.status == 200))
        .count();
    let m = server.metrics();
    assert_eq!(served, CLIENTS, "{m}\n{}", server.log_text());
    assert_eq!(
        metric(&m, "anteroom_client_connections_idle_closed_total"),
        Some(0.0),
        "{m}"
    );
}

#[test]
fn refused_with_503_when_no_connection_is_idle() {
    let server = Server::start(None, &["--workers", "3", "--max-connections", "3"], &[]);
    // Three connections whose requests are at a worker (or queued, while one starts): none may be closed.
    // Each for 5 s, all at once: a loaded machine still sees the three in progress together.
    let busy: Vec<TcpStream> = (0..3)
        .map(|_| {
            let mut s = TcpStream::connect(server.addr()).unwrap();
            s.write_all(b"GET /sleep?ms=5000 HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n")
                .unwrap();
            s
        })
        .collect();
    wait_until(
        "three requests in progress",
        Duration::from_secs(10),
        || server.status()["connections"]["requests_in_progress"].as_u64() == Some(3),
    );
    let t = Instant::now();
    let r =
        get_timeout(server.addr(), "/", Duration::from_secs(10)).expect("an answer, not a hang");
    assert_eq!(r.status, 503, "{r:?}");
    assert!(r.header("retry-after").is_some(), "{r:?}");
    assert_eq!(r.header("connection").as_deref(), Some("close"));
    assert!(
        t.elapsed() < Duration::from_secs(4),
        "answered at once, not after the sleeps"
    );
    for mut s in busy {
        s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
        assert_eq!(
            read_response(&mut s).unwrap().status,
            200,
            "busy ones are served"
        );
    }
    assert_eq!(server.get("/").unwrap().status, 200, "room again");
    let m = server.metrics();
    assert!(
        metric(&m, "anteroom_client_connections_refused_total").unwrap_or(0.0) >= 1.0,
        "{m}"
    );
}

#[test]
fn max_connections_above_the_fd_limit_is_refused_at_start() {
    let out = command(Some(1024))
        .args([
            "--listen",
            &format!("127.0.0.1:{}", free_port()),
            "--admin",
            "off",
        ])
        .args(["--max-connections", "5000"])
        .stdout(Stdio::null())
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(
        err.contains("max-connections") && err.contains("RLIMIT_NOFILE is 1024"),
        "{err}"
    );
}

#[test]
fn status_shows_paths_not_query_strings() {
    for show in [false, true] {
        let args: &[&str] = if show {
            &["--workers", "1", "--status-show-query"]
        } else {
            &["--workers", "1"]
        };
        let server = Arc::new(Server::start(None, args, &[]));
        let s = server.clone();
        let slow = thread::spawn(move || {
            get_timeout(
                s.addr(),
                "/sleep?ms=3000&access_token=SECRET1",
                Duration::from_secs(30),
            )
        });
        let mut pid = 0;
        wait_until("the worker is busy", Duration::from_secs(10), || {
            let st = server.status();
            let busy = st["workers"]
                .as_array()
                .and_then(|ws| ws.iter().find(|w| w["state"] == "busy").cloned());
            if let Some(w) = busy {
                pid = w["pid"].as_u64().unwrap() as u32;
                let req = w["request"].as_str().unwrap_or_default().to_string();
                assert!(req.starts_with("GET /sleep"), "{req}");
                assert_eq!(req.contains("SECRET1"), show, "{req}");
                true
            } else {
                false
            }
        });
        // Killed holding it: the death shows the path only, too.
        signal(pid, 9);
        wait_until("the death is recorded", Duration::from_secs(10), || {
            server.status()["deaths"]
                .as_array()
                .is_some_and(|d| !d.is_empty())
        });
        let st = server.status();
        let target = st["deaths"][0]["request"]["target"]
            .as_str()
            .unwrap_or_default()
            .to_string();
        assert!(target.starts_with("/sleep"), "{st}");
        assert_eq!(target.contains("SECRET1"), show, "{target}");
        let _ = slow.join();
    }
}

#[test]
fn stale_socket_directories_are_removed() {
    let tmp = tempfile::tempdir().unwrap();
    let mut gone = Command::new("true").spawn().unwrap();
    let dead = gone.id();
    gone.wait().unwrap();
    let stale = tmp.path().join(format!("anteroom.{dead}.0badc0de"));
    std::fs::create_dir(&stale).unwrap();
    std::fs::write(stale.join("w0.g1.1.sock"), "").unwrap();
    let tmpdir = tmp.path().to_str().unwrap();
    let server = Server::start(
        None,
        &["--workers", "1"],
        &[
            ("TMPDIR", tmpdir),
            ("XDG_RUNTIME_DIR", ""),
            ("RUNTIME_DIRECTORY", ""),
        ],
    );
    assert!(!stale.exists(), "the dead run's directory is removed");
    let mine = format!("anteroom.{}.", server.pid());
    assert!(dirs_named(tmp.path(), &mine) == 1, "ours is in TMPDIR");
    drop(server);
    assert_eq!(
        dirs_named(tmp.path(), "anteroom."),
        0,
        "and removed at stop"
    );

    // systemd's RuntimeDirectory= comes first.
    let run = tempfile::tempdir().unwrap();
    let server = Server::start(
        None,
        &["--workers", "1"],
        &[
            ("TMPDIR", tmpdir),
            ("RUNTIME_DIRECTORY", run.path().to_str().unwrap()),
        ],
    );
    assert_eq!(
        dirs_named(run.path(), &format!("anteroom.{}.", server.pid())),
        1
    );
    assert_eq!(dirs_named(tmp.path(), "anteroom."), 0);
}

fn dirs_named(base: &Path, prefix: &str) -> usize {
    std::fs::read_dir(base)
        .unwrap()
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().starts_with(prefix))
        .count()
}

/// One FastCGI request (GET `path`) on a raw connection.
fn fcgi_get(id: u16, path: &str) -> Vec<u8> {
    let mut out = bytes::BytesMut::new();
    common::fcgi_request(id, "GET", path, &[], b"", &mut out);
    out.to_vec()
}

/// Reads records until one of `kind` arrives; its content.
fn fcgi_until(s: &mut std::os::unix::net::UnixStream, kind: u8) -> Vec<u8> {
    let mut buf = bytes::BytesMut::new();
    let mut chunk = [0u8; 8192];
    loop {
        while let Some(rec) = anteroom::fastcgi::decode_record(&mut buf).unwrap() {
            if rec.kind == kind {
                return rec.content.to_vec();
            }
        }
        let n = read_some(s, &mut chunk).expect("a record");
        assert!(n > 0, "closed before a record of type {kind}");
        buf.extend_from_slice(&chunk[..n]);
    }
}

fn unix_closed_by_server(s: &mut std::os::unix::net::UnixStream, wait: Duration) -> bool {
    s.set_read_timeout(Some(wait)).unwrap();
    let mut b = [0u8; 64];
    match read_some(s, &mut b) {
        Ok(0) => true,
        Ok(_) => false,
        Err(e) => !matches!(
            e.kind(),
            std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
        ),
    }
}

#[test]
fn fastcgi_connections_count_and_close_only_when_idle() {
    use anteroom::fastcgi as fcgi;
    use std::os::unix::net::UnixStream;
    let dir = tempfile::tempdir().unwrap();
    let fsock = dir.path().join("f.sock");
    let listen = format!("unix:{}", fsock.display());
    let server = Server::start(
        None,
        &[
            "--workers",
            "1",
            "--max-connections",
            "2",
            "--listen-fastcgi",
            &listen,
        ],
        &[],
    );
    // b has a request at the worker: never closed for room.
    let mut b = UnixStream::connect(&fsock).unwrap();
    b.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    b.write_all(&fcgi_get(1, "/sleep?ms=1500")).unwrap();
    wait_until("b's request in progress", Duration::from_secs(10), || {
        server.status()["connections"]["requests_in_progress"].as_u64() == Some(1)
    });
    let mut a = UnixStream::connect(&fsock).unwrap();
    thread::sleep(Duration::from_millis(50));
    let _c = UnixStream::connect(&fsock).unwrap();
    assert!(
        unix_closed_by_server(&mut a, Duration::from_secs(5)),
        "a, idle, made room"
    );
    let end = fcgi_until(&mut b, fcgi::END_REQUEST);
    assert_eq!(
        fcgi::EndRequest::parse(&end).unwrap().protocol_status,
        fcgi::REQUEST_COMPLETE
    );
    assert_eq!(server.status()["connections"]["open"].as_u64(), Some(2));
    // The limit is what FCGI_MAX_CONNS says. (A new connection: c, the oldest idle one, makes room.)
    let mut d = UnixStream::connect(&fsock).unwrap();
    d.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let mut q = Vec::new();
    fcgi::encode_pair(b"FCGI_MAX_CONNS", b"", &mut q).unwrap();
    let mut out = bytes::BytesMut::new();
    fcgi::encode_record(fcgi::GET_VALUES, 0, &q, &mut out);
    d.write_all(&out).unwrap();
    let values = fcgi::decode_pairs(&fcgi_until(&mut d, fcgi::GET_VALUES_RESULT)).unwrap();
    assert_eq!(values[0].1.as_ref(), b"2");
}
