//! systemd both ways, and upgrades with no lost request.
//!
//! Socket activation runs under `systemd-socket-activate` (no systemd as PID 1 needed), with `NOTIFY_SOCKET`
//! pointing at a datagram socket the test reads. Upgrades and restarts run under load from `oha` (GETs and
//! POSTs with bodies, 50 connections) and must lose nothing: every request answered 200, no error.

mod common;

use std::io::Write;
use std::net::{SocketAddr, TcpListener};
use std::os::unix::net::UnixDatagram;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use common::{free_port, request, require, signal, wait_timeout, Response, BIN};

/// The messages on a notify socket, as they arrive.
struct Notifications {
    socket: UnixDatagram,
    path: PathBuf,
    seen: Vec<String>,
}

impl Notifications {
    fn new(dir: &Path) -> Notifications {
        let path = dir.join("notify.sock");
        let socket = UnixDatagram::bind(&path).unwrap();
        socket
            .set_read_timeout(Some(Duration::from_millis(100)))
            .unwrap();
        Notifications {
            socket,
            path,
            seen: Vec::new(),
        }
    }

    /// Waits for a message containing `line`, at most `limit`; returns it.
    fn wait_for(&mut self, line: &str, limit: Duration) -> Option<String> {
        let deadline = Instant::now() + limit;
        if let Some(m) = self.seen.iter().find(|m| m.lines().any(|l| l == line)) {
            return Some(m.clone());
        }
        let mut buf = [0u8; 4096];
        while Instant::now() < deadline {
            if let Ok(n) = self.socket.recv(&mut buf) {
                let m = String::from_utf8_lossy(&buf[..n]).into_owned();
                self.seen.push(m.clone());
                if m.lines().any(|l| l == line) {
                    return Some(m);
                }
            }
        }
        None
    }

    fn count(&self, line: &str) -> usize {
        self.seen
            .iter()
            .filter(|m| m.lines().any(|l| l == line))
            .count()
    }
}

fn get(addr: SocketAddr, path: &str) -> std::io::Result<Response> {
    request(
        addr,
        format!("GET {path} HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n").as_bytes(),
    )
}

/// The pid of the anteroom process that served a request: the parent of the demo worker that answered.
fn serving_pid(addr: SocketAddr) -> u32 {
    let r = get(addr, "/sleep?ms=1").unwrap();
    let worker: u32 = r
        .text()
        .trim()
        .rsplit(' ')
        .next()
        .and_then(|p| p.parse().ok())
        .unwrap_or_else(|| panic!("{}", r.text()));
    parent_of(worker)
}

fn parent_of(pid: u32) -> u32 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("PPid:"))
        .and_then(|p| p.trim().parse().ok())
        .unwrap_or(0)
}

fn alive(pid: u32) -> bool {
    Path::new(&format!("/proc/{pid}")).exists()
        && !std::fs::read_to_string(format!("/proc/{pid}/stat"))
            .unwrap_or_default()
            .contains(") Z ")
}

fn wait_until(what: &str, limit: Duration, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + limit;
    while !f() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        thread::sleep(Duration::from_millis(20));
    }
}

/// Kills leftover processes (upgraded anteroom instances are not the test's children) at the end.
struct Reaper(Vec<u32>);

impl Drop for Reaper {
    fn drop(&mut self) {
        for pid in &self.0 {
            if alive(*pid) {
                signal(*pid, 15);
            }
        }
    }
}

#[allow(
    clippy::too_many_lines,
    reason = "one scenario: the notifications of one run, in the order systemd sees them"
)]
#[test]
fn socket_activation_and_notifications() {
    require("systemd-socket-activate");
    let dir = tempfile::tempdir().unwrap();
    let mut notes = Notifications::new(dir.path());
    let log = dir.path().join("anteroom.log");
    let port = free_port();
    let addr: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    let mut child = Command::new("systemd-socket-activate")
        .arg("-l")
        .arg(addr.to_string())
        .arg("--fdname=http")
        .arg(format!("--setenv=NOTIFY_SOCKET={}", notes.path.display()))
        .arg("--setenv=WATCHDOG_USEC=400000")
        .arg("--setenv=ANTEROOM_LOG=info")
        .arg(BIN)
        // Not used: the passed socket replaces it.
        .args([
            "--listen",
            "127.0.0.1:1",
            "--admin",
            "off",
            "--workers",
            "1",
        ])
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .unwrap();
    let mut reaper = Reaper(vec![child.id()]);
    let log_text = || std::fs::read_to_string(&log).unwrap_or_default();
    // systemd-socket-activate starts anteroom at the first connection, which anteroom then serves.
    let served = (0..100).find_map(|_| {
        get(addr, "/").ok().or_else(|| {
            thread::sleep(Duration::from_millis(50));
            None
        })
    });
    assert_eq!(served.map(|r| r.status), Some(200), "{}", log_text());
    let ready = notes
        .wait_for("READY=1", Duration::from_secs(10))
        .unwrap_or_else(|| panic!("no READY=1: {:?}\n{}", notes.seen, log_text()));
    assert!(ready.contains("STATUS=queue "), "{ready}");
    assert!(
        log_text().contains("serving on the sockets passed by systemd"),
        "{}",
        log_text()
    );
    assert!(log_text().contains("worker started"), "{}", log_text());
    // --listen is not bound when sockets are passed: the passed one is served.
    let serving: Vec<String> = log_text()
        .lines()
        .filter(|l| l.contains("serving HTTP"))
        .map(str::to_owned)
        .collect();
    assert!(
        serving.len() == 1 && serving[0].ends_with(&format!("listen={addr}")),
        "{serving:?}"
    );
    // The workers did not inherit the systemd variables.
    let env = get(addr, "/env").unwrap().text();
    assert!(
        !env.contains("NOTIFY_SOCKET") && !env.contains("LISTEN_FDS"),
        "{env}"
    );
    // STATUS= every two seconds, WATCHDOG=1 every 200 ms (half of WATCHDOG_USEC).
    let status_lines = |n: &Notifications| n.seen.iter().filter(|m| m.contains("STATUS=")).count();
    notes.wait_for("never", Duration::from_millis(2500));
    assert!(status_lines(&notes) >= 2, "{:?}", notes.seen);
    assert!(notes.count("WATCHDOG=1") >= 5, "{:?}", notes.seen);
    // SIGHUP: RELOADING=1, then READY=1 again once the new generation is up.
    let readies = notes.count("READY=1");
    signal(child.id(), 1);
    assert!(notes
        .wait_for("RELOADING=1", Duration::from_secs(5))
        .is_some());
    wait_until("READY=1 after the reload", Duration::from_secs(10), || {
        notes.wait_for("never", Duration::from_millis(50));
        notes.count("READY=1") > readies
    });
    // SIGTERM: STOPPING=1, and a clean exit.
    signal(child.id(), 15);
    assert!(
        notes
            .wait_for("STOPPING=1", Duration::from_secs(10))
            .is_some(),
        "{:?}",
        notes.seen
    );
    let status = wait_timeout(&mut child, Duration::from_secs(20)).expect("anteroom stops");
    assert!(status.success(), "{status:?}\n{}", log_text());
    reaper.0.clear();
}

/// oha's verdict on one run: answers by status and errors by kind.
struct Load {
    child: Child,
    out: PathBuf,
}

impl Load {
    /// `connections` clients for `secs`, each waiting out its last request when the time is up.
    fn start(addr: SocketAddr, connections: u32, secs: u32, post: bool, out: PathBuf) -> Load {
        let mut cmd = Command::new("oha");
        cmd.args(["--no-tui", "--output-format", "json", "-w"])
            .args(["-c", &connections.to_string()])
            .args(["-z", &format!("{secs}s")]);
        let url = if post {
            cmd.args(["-m", "POST", "-T", "application/octet-stream"])
                .args(["-d", &"x".repeat(3000)]);
            format!("http://{addr}/sum")
        } else {
            format!("http://{addr}/sleep?ms=2")
        };
        let child = cmd
            .arg(url)
            .stdout(std::fs::File::create(&out).unwrap())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        Load { child, out }
    }

    /// (requests answered 200, everything else: other statuses and errors), with oha's JSON for a message.
    fn finish(mut self) -> (u64, u64, String) {
        let status = self.child.wait().unwrap();
        let text = std::fs::read_to_string(&self.out).unwrap_or_default();
        assert!(status.success(), "oha failed: {text}");
        let v: serde_json::Value = serde_json::from_str(&text).unwrap();
        let count = |key: &str| -> Vec<(String, u64)> {
            v[key]
                .as_object()
                .map(|m| {
                    m.iter()
                        .map(|(k, n)| (k.clone(), n.as_u64().unwrap_or(0)))
                        .collect()
                })
                .unwrap_or_default()
        };
        let statuses = count("statusCodeDistribution");
        let errors = count("errorDistribution");
        let ok = statuses
            .iter()
            .filter(|(k, _)| k == "200")
            .map(|(_, n)| n)
            .sum();
        let bad = statuses
            .iter()
            .filter(|(k, _)| k != "200")
            .map(|(_, n)| n)
            .sum::<u64>()
            + errors.iter().map(|(_, n)| n).sum::<u64>();
        (ok, bad, format!("statuses {statuses:?}, errors {errors:?}"))
    }
}

/// Copies the built binary to `to` by way of a rename, as a package upgrade does: the running file is
/// replaced, not rewritten.
fn install(to: &Path) {
    let tmp = to.with_extension("new");
    std::fs::copy(BIN, &tmp).unwrap();
    std::fs::rename(&tmp, to).unwrap();
}

/// Starts a copy that `install` just wrote. Another test's thread may fork while the copy is open for
/// writing, and its child holds that descriptor until it execs: exec then fails with ETXTBSY for a moment.
fn spawn_installed(cmd: &mut Command) -> std::process::Child {
    let mut tries = 0;
    loop {
        match cmd.spawn() {
            Err(e) if e.kind() == std::io::ErrorKind::ExecutableFileBusy && tries < 50 => {
                tries += 1;
                thread::sleep(Duration::from_millis(20));
            }
            r => return r.unwrap(),
        }
    }
}

/// The pid in the last "new_pid=N" of the log.
fn last_new_pid(log: &str) -> Option<u32> {
    log.rsplit("new_pid=")
        .next()
        .filter(|_| log.contains("new_pid="))?
        .split(|c: char| !c.is_ascii_digit())
        .next()?
        .parse()
        .ok()
}

/// anteroom started from a copy of the binary in a temp directory, which each upgrade replaces as a package
/// upgrade does, logging to a file there; every process of the run, old and new, is stopped at the end.
struct Installed {
    dir: tempfile::TempDir,
    exe: PathBuf,
    log: PathBuf,
    child: Child,
    /// The processes so far, oldest first: the last one serves.
    pids: Vec<u32>,
    reaper: Reaper,
}

impl Installed {
    /// Starts it with `args`, where `{dir}` stands for the run's directory (where sockets may go).
    fn start(args: &[&str]) -> Installed {
        let dir = tempfile::tempdir().unwrap();
        let exe = dir.path().join("anteroom");
        install(&exe);
        let log = dir.path().join("anteroom.log");
        let child = spawn_installed(
            Command::new(&exe)
                .args(
                    args.iter()
                        .map(|a| a.replace("{dir}", &dir.path().to_string_lossy())),
                )
                .env("ANTEROOM_LOG", "info")
                .stdout(Stdio::null())
                .stderr(std::fs::File::create(&log).unwrap()),
        );
        let first = child.id();
        Installed {
            dir,
            exe,
            log,
            child,
            pids: vec![first],
            reaper: Reaper(vec![first]),
        }
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    fn serving(&self) -> u32 {
        *self.pids.last().unwrap()
    }

    /// Installs the binary again and sends SIGUSR2 to the serving process; returns that (old) pid.
    fn begin_upgrade(&self) -> u32 {
        install(&self.exe);
        let old = self.serving();
        signal(old, 12);
        old
    }

    /// Waits until `old` has exited; the new process's pid, which serves from now on.
    fn finish_upgrade(&mut self, old: u32) -> u32 {
        wait_until("the old process to exit", Duration::from_secs(30), || {
            !alive(old)
        });
        let log = self.log_text();
        let new = last_new_pid(&log).unwrap_or_else(|| panic!("{log}"));
        assert!(!self.pids.contains(&new), "{log}");
        self.pids.push(new);
        self.reaper.0.push(new);
        new
    }

    fn upgrade(&mut self) -> u32 {
        let old = self.begin_upgrade();
        self.finish_upgrade(old)
    }

    /// Whether the first process, replaced, exited as after a signal.
    fn first_exited_well(&mut self) -> bool {
        self.child.wait().unwrap().success()
    }

    /// Stops the serving process (SIGTERM) and waits for it.
    fn stop(&self) {
        let last = self.serving();
        signal(last, 15);
        wait_until("the last process to stop", Duration::from_secs(30), || {
            !alive(last)
        });
    }
}

#[test]
fn upgrades_under_load_lose_no_request() {
    require("oha");
    let addr: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    let listen = addr.to_string();
    let mut a = Installed::start(&[
        "--listen",
        &listen,
        "--admin",
        "off",
        "--workers",
        "4",
        "--max-queue",
        "10000",
    ]);
    wait_until("anteroom to serve", Duration::from_secs(20), || {
        get(addr, "/").is_ok_and(|r| r.status == 200)
    });
    assert_eq!(serving_pid(addr), a.serving());

    let gets = Load::start(addr, 30, 20, false, a.path("gets.json"));
    let posts = Load::start(addr, 20, 20, true, a.path("posts.json"));
    for _ in 0..2 {
        thread::sleep(Duration::from_secs(5));
        a.upgrade();
    }
    assert!(a.first_exited_well());
    let (get_ok, get_bad, get_detail) = gets.finish();
    let (post_ok, post_bad, post_detail) = posts.finish();
    eprintln!(
        "UPGRADE-RESULT upgrades=2 get_ok={get_ok} get_failed={get_bad} post_ok={post_ok} post_failed={post_bad} pids={:?}",
        a.pids
    );
    assert_eq!(get_bad, 0, "GETs: {get_detail}\n{}", a.log_text());
    assert_eq!(post_bad, 0, "POSTs: {post_detail}\n{}", a.log_text());
    assert!(
        get_ok > 1000 && post_ok > 1000,
        "{get_detail} {post_detail}"
    );
    assert_eq!(serving_pid(addr), a.serving());
    assert!(a.log_text().contains("upgrade: the new process is ready"));
    a.stop();
}

#[test]
fn a_failed_upgrade_keeps_the_old_process_serving() {
    let dir = tempfile::tempdir().unwrap();
    let exe = dir.path().join("anteroom");
    install(&exe);
    let log = dir.path().join("anteroom.log");
    let port = free_port();
    let addr: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    let mut child = spawn_installed(
        Command::new(&exe)
            .args([
                "--listen",
                &addr.to_string(),
                "--admin",
                "off",
                "--workers",
                "1",
            ])
            .env("ANTEROOM_LOG", "info")
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap()),
    );
    let log_text = || std::fs::read_to_string(&log).unwrap_or_default();
    wait_until("anteroom to serve", Duration::from_secs(20), || {
        get(addr, "/").is_ok_and(|r| r.status == 200)
    });
    // The "new binary" exits at once.
    let tmp = exe.with_extension("new");
    let mut f = std::fs::File::create(&tmp).unwrap();
    f.write_all(b"#!/bin/sh\necho broken new binary >&2\nexit 1\n")
        .unwrap();
    drop(f);
    std::fs::set_permissions(&tmp, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    std::fs::rename(&tmp, &exe).unwrap();
    signal(child.id(), 12);
    wait_until("the failure to be logged", Duration::from_secs(10), || {
        log_text().contains("upgrade failed")
    });
    assert!(
        log_text().contains("exited before it was ready"),
        "{}",
        log_text()
    );
    assert_eq!(get(addr, "/").unwrap().status, 200);
    assert_eq!(serving_pid(addr), child.id());
    signal(child.id(), 15);
    assert!(wait_timeout(&mut child, Duration::from_secs(20))
        .unwrap()
        .success());
}

/// A restart of a socket-activated service, as systemd does it with the socket unit holding the socket:
/// the test holds it and passes it (LISTEN_FDS) to instance A, then to instance B, and stops A once B
/// serves. Nothing is lost: connections wait in the kernel's queue for whichever accepts.
#[test]
fn a_restart_on_a_held_socket_loses_no_request() {
    require("oha");
    let dir = tempfile::tempdir().unwrap();
    let socket = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = socket.local_addr().unwrap();
    let start = |name: &str| {
        let log = dir.path().join(format!("{name}.log"));
        let fd: std::os::fd::OwnedFd = socket.try_clone().unwrap().into();
        // The socket arrives as stdin; the shell makes it fd 3 and sets LISTEN_PID to its own pid, which
        // exec keeps.
        let child = Command::new("sh")
            .arg("-c")
            .arg("exec 3<&0 0</dev/null; export LISTEN_PID=$$ LISTEN_FDS=1 LISTEN_FDNAMES=http; exec \"$@\"")
            .arg("sh")
            .arg(BIN)
            .args(["--admin", "off", "--workers", "3"])
            .env("ANTEROOM_LOG", "info")
            .stdin(Stdio::from(fd))
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .unwrap();
        (child, log)
    };
    let (mut a, a_log) = start("a");
    let mut reaper = Reaper(vec![a.id()]);
    wait_until("A to serve", Duration::from_secs(20), || {
        get(addr, "/").is_ok_and(|r| r.status == 200)
    });
    let gets = Load::start(addr, 30, 12, false, dir.path().join("gets.json"));
    let posts = Load::start(addr, 20, 12, true, dir.path().join("posts.json"));
    thread::sleep(Duration::from_secs(4));
    let (mut b, b_log) = start("b");
    reaper.0.push(b.id());
    wait_until("B to start its workers", Duration::from_secs(20), || {
        std::fs::read_to_string(&b_log)
            .unwrap_or_default()
            .contains("worker started")
    });
    thread::sleep(Duration::from_millis(500));
    signal(a.id(), 15);
    let status = wait_timeout(&mut a, Duration::from_secs(30)).expect("A stops");
    assert!(status.success());
    let (get_ok, get_bad, get_detail) = gets.finish();
    let (post_ok, post_bad, post_detail) = posts.finish();
    eprintln!(
        "RESTART-RESULT get_ok={get_ok} get_failed={get_bad} post_ok={post_ok} post_failed={post_bad}"
    );
    let logs = format!(
        "A:\n{}\nB:\n{}",
        std::fs::read_to_string(&a_log).unwrap_or_default(),
        std::fs::read_to_string(&b_log).unwrap_or_default()
    );
    assert_eq!(get_bad, 0, "GETs: {get_detail}\n{logs}");
    assert_eq!(post_bad, 0, "POSTs: {post_detail}\n{logs}");
    assert!(get_ok > 500 && post_ok > 500, "{get_detail} {post_detail}");
    assert_eq!(serving_pid(addr), b.id());
    signal(b.id(), 15);
    assert!(wait_timeout(&mut b, Duration::from_secs(30))
        .unwrap()
        .success());
    reaper.0.clear();
}

/// An upgrade on a unix listener: the old process leaves the socket file to the new one, which serves on
/// it; the last process to stop removes it.
#[test]
fn an_upgrade_keeps_the_unix_socket_file() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("http.sock");
    let log = dir.path().join("anteroom.log");
    let mut child = Command::new(BIN)
        .args(["--listen", &format!("unix:{}", path.display())])
        .args(["--admin", "off", "--workers", "1"])
        .env("ANTEROOM_LOG", "info")
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .unwrap();
    let mut reaper = Reaper(vec![child.id()]);
    let log_text = || std::fs::read_to_string(&log).unwrap_or_default();
    let get_unix = || -> std::io::Result<Response> {
        let mut s = std::os::unix::net::UnixStream::connect(&path)?;
        s.set_read_timeout(Some(Duration::from_secs(10)))?;
        s.write_all(b"GET /sleep?ms=1 HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n")?;
        common::read_response(&mut s)
    };
    wait_until("anteroom to serve", Duration::from_secs(20), || {
        get_unix().is_ok_and(|r| r.status == 200)
    });
    signal(child.id(), 12);
    assert!(wait_timeout(&mut child, Duration::from_secs(30))
        .expect("the old process exits")
        .success());
    let new = last_new_pid(&log_text()).unwrap_or_else(|| panic!("{}", log_text()));
    reaper.0.push(new);
    assert!(path.exists(), "{}", log_text());
    let r = get_unix().unwrap();
    assert_eq!(r.status, 200);
    let worker: u32 = r.text().trim().rsplit(' ').next().unwrap().parse().unwrap();
    assert_eq!(parent_of(worker), new);
    signal(new, 15);
    wait_until("the new process to stop", Duration::from_secs(30), || {
        !alive(new)
    });
    assert!(!path.exists(), "the last one removes it");
    reaper.0.clear();
}

/// An upgrade under systemd: the old process says RELOADING=1, the new one MAINPID=its pid and READY=1
/// (what Type=notify with NotifyAccess=all needs), and serves on the socket systemd passed.
#[test]
fn a_socket_activated_upgrade_reports_the_new_main_pid() {
    require("systemd-socket-activate");
    let dir = tempfile::tempdir().unwrap();
    let mut notes = Notifications::new(dir.path());
    let log = dir.path().join("anteroom.log");
    let port = free_port();
    let addr: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    let mut child = Command::new("systemd-socket-activate")
        .arg("-l")
        .arg(addr.to_string())
        .arg("--fdname=anteroom.socket")
        .arg(format!("--setenv=NOTIFY_SOCKET={}", notes.path.display()))
        .arg("--setenv=ANTEROOM_LOG=info")
        .arg(BIN)
        .args(["--admin", "off", "--workers", "1"])
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .unwrap();
    let mut reaper = Reaper(vec![child.id()]);
    let log_text = || std::fs::read_to_string(&log).unwrap_or_default();
    let served = (0..100).find_map(|_| {
        get(addr, "/").ok().or_else(|| {
            thread::sleep(Duration::from_millis(50));
            None
        })
    });
    assert_eq!(served.map(|r| r.status), Some(200), "{}", log_text());
    assert!(notes.wait_for("READY=1", Duration::from_secs(10)).is_some());
    signal(child.id(), 12);
    assert!(notes
        .wait_for("RELOADING=1", Duration::from_secs(10))
        .is_some());
    assert!(wait_timeout(&mut child, Duration::from_secs(30))
        .expect("the old process exits")
        .success());
    let new = last_new_pid(&log_text()).unwrap_or_else(|| panic!("{}", log_text()));
    reaper.0.push(new);
    let main = notes
        .wait_for(&format!("MAINPID={new}"), Duration::from_secs(5))
        .unwrap_or_else(|| panic!("{:?}", notes.seen));
    assert!(main.lines().any(|l| l == "READY=1"), "{main}");
    assert!(
        notes.count("STOPPING=1") == 0,
        "a handover is no stop: {:?}",
        notes.seen
    );
    assert_eq!(serving_pid(addr), new);
    signal(new, 15);
    assert!(notes
        .wait_for("STOPPING=1", Duration::from_secs(10))
        .is_some());
    wait_until("the new process to stop", Duration::from_secs(30), || {
        !alive(new)
    });
    reaper.0.clear();
}

/// nginx keeps its FastCGI connections to anteroom alive and never stops sending on them under load, and
/// FastCGI has no `Connection: close`: closing them at an upgrade raced nginx, which answered a POST it sent
/// on one as it closed with 502. The old process passes them to the new one instead. Three upgrades in a
/// row, under GETs and POSTs.
#[test]
fn an_upgrade_behind_nginx_fastcgi_pass_loses_no_request() {
    require("oha");
    let mut a = Installed::start(&[
        "--listen-fastcgi",
        "unix:{dir}/fcgi.sock",
        "--admin",
        "off",
        "--workers",
        "4",
        "--max-queue",
        "10000",
    ]);
    let nginx = common::Nginx::start_with(
        &format!(
            "upstream ant {{ server unix:{}; keepalive 32; }}",
            a.path("fcgi.sock").display()
        ),
        "  location / {\n include /etc/nginx/fastcgi_params;\n fastcgi_keep_conn on;\n fastcgi_pass ant;\n  }",
    );
    let addr = nginx.addr();
    wait_until(
        "anteroom to serve through nginx",
        Duration::from_secs(20),
        || get(addr, "/").is_ok_and(|r| r.status == 200),
    );
    let gets = Load::start(addr, 30, 12, false, a.path("gets.json"));
    let posts = Load::start(addr, 10, 12, true, a.path("posts.json"));
    let mut handover = Duration::ZERO;
    for round in 1..=3 {
        thread::sleep(Duration::from_secs(3));
        let signalled = Instant::now();
        a.upgrade();
        // While the load still runs: the old process must not wait for nginx's connections to fall
        // silent, which under load they never do.
        handover = handover.max(signalled.elapsed());
        // nginx's kept-alive connections went to the new process, not closed.
        wait_until(
            "the new process to say what it adopted",
            Duration::from_secs(5),
            || a.log_text().matches("adopted=").count() == round,
        );
    }
    assert!(!a.log_text().contains("adopted=0 "), "{}", a.log_text());
    assert!(a.first_exited_well());
    let (get_ok, get_bad, get_detail) = gets.finish();
    let (post_ok, post_bad, post_detail) = posts.finish();
    eprintln!(
        "UPGRADE-FASTCGI-RESULT get_ok={get_ok} get_failed={get_bad} post_ok={post_ok} post_failed={post_bad} old_exited_after={handover:?}"
    );
    assert!(
        handover < Duration::from_secs(6),
        "the old process took {handover:?} to hand over"
    );
    let (log, nginx_log) = (a.log_text(), nginx.error_log());
    let failed = (get_bad, post_bad);
    assert_eq!(
        failed,
        (0, 0),
        "GETs: {get_detail}\nPOSTs: {post_detail}\n{log}\nnginx: {nginx_log}"
    );
    assert!(get_ok > 500 && post_ok > 100, "{get_detail} {post_detail}");
    a.stop();
}

/// One request on a kept-alive HTTP connection; the pid of the worker that answered.
fn http_call(s: &mut std::net::TcpStream, method: &str, path: &str) -> (Response, u32) {
    let body = if method == "POST" { "posted" } else { "" };
    // One write: `write!` would send each piece in a packet of its own, each held back by Nagle.
    let req = format!(
        "{method} {path} HTTP/1.1\r\nHost: t\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    );
    s.write_all(req.as_bytes()).unwrap();
    http_answer(s)
}

fn http_answer(s: &mut std::net::TcpStream) -> (Response, u32) {
    let r = common::read_response(s).unwrap_or_else(|e| panic!("no answer: {e}"));
    let worker = last_number(&r.text());
    (r, worker)
}

fn last_number(text: &str) -> u32 {
    text.split_whitespace()
        .last()
        .and_then(|p| p.parse().ok())
        .unwrap_or_else(|| panic!("no worker pid in {text:?}"))
}

/// Sends one FastCGI request on `s` (a POST carries a body).
fn fcgi_send(s: &mut std::os::unix::net::UnixStream, method: &str, path: &str) {
    let body: &[u8] = if method == "POST" { b"posted" } else { b"" };
    let mut out = bytes::BytesMut::new();
    common::fcgi_request(1, method, path, &[], body, &mut out);
    s.write_all(&out).unwrap();
}

/// Reads one FastCGI answer: its STDOUT, and the pid of the worker that answered.
fn fcgi_answer(s: &mut std::os::unix::net::UnixStream) -> (String, u32) {
    let (stdout, _) = common::fcgi_answer(s, 1);
    let text = String::from_utf8_lossy(&stdout).into_owned();
    let worker = last_number(&text);
    (text, worker)
}

/// Kept-alive connections go with the listening sockets at an upgrade. A client that sends its next request
/// on a connection it opened to the old process, once that process has exited, is answered by the new one:
/// whether the connection was idle at the upgrade or had a request in flight, HTTP or FastCGI, GET or POST.
/// Closing them instead races every client that reuses a connection: nginx answers a POST it sends on one
/// as it closes with 502 (one in 41,742 in the test below, once); FastCGI cannot say `Connection: close`.
#[allow(
    clippy::too_many_lines,
    reason = "one scenario: four connections through one upgrade, each asked before and after"
)]
#[test]
fn an_upgrade_hands_kept_alive_connections_to_the_new_process() {
    const MANY: usize = 1000;
    let addr: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    let listen = addr.to_string();
    let mut a = Installed::start(&[
        "--listen",
        &listen,
        "--listen-fastcgi",
        "unix:{dir}/fcgi.sock",
        "--admin",
        "off",
        "--workers",
        "2",
    ]);
    let (first, sock) = (a.serving(), a.path("fcgi.sock"));
    wait_until("anteroom to serve", Duration::from_secs(20), || {
        get(addr, "/").is_ok_and(|r| r.status == 200)
    });
    wait_until("both workers", Duration::from_secs(20), || {
        common::children(first).len() == 2
    });
    let old_workers = common::children(first);
    let connect = || {
        let s = std::net::TcpStream::connect(addr).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
        s
    };
    let fconnect = || {
        let s = std::os::unix::net::UnixStream::connect(&sock).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
        s
    };
    // Idle at the upgrade: one request each, then silence.
    let (mut idle, mut fidle) = (connect(), fconnect());
    let (r, _) = http_call(&mut idle, "GET", "/sleep?ms=1");
    assert_eq!(r.status, 200);
    fcgi_send(&mut fidle, "GET", "/sleep?ms=1");
    fcgi_answer(&mut fidle);
    // And many more idle ones: all of them go, however many.
    let mut many: Vec<_> = (0..MANY)
        .map(|_| {
            let mut s = connect();
            assert_eq!(http_call(&mut s, "GET", "/sleep?ms=0").0.status, 200);
            s
        })
        .collect();
    // Busy at the upgrade: a request at each worker until after the new process is ready.
    let (mut busy, mut fbusy) = (connect(), fconnect());
    busy.write_all(b"GET /sleep?ms=2500 HTTP/1.1\r\nHost: t\r\n\r\n")
        .unwrap();
    fcgi_send(&mut fbusy, "GET", "/sleep?ms=2500");
    thread::sleep(Duration::from_millis(300));
    let old = a.begin_upgrade();
    let (r, worker) = http_answer(&mut busy);
    assert_eq!(r.status, 200);
    assert!(old_workers.contains(&worker), "answered by the old process");
    assert!(
        r.header("connection").is_none(),
        "no close announced: the connection goes on to the new process\n{}",
        r.head
    );
    let (_, worker) = fcgi_answer(&mut fbusy);
    assert!(old_workers.contains(&worker), "answered by the old process");
    let new = a.finish_upgrade(old);
    assert!(a.first_exited_well());
    let log_text = || a.log_text();
    for (name, s) in [("idle", &mut idle), ("busy", &mut busy)] {
        for method in ["POST", "GET"] {
            let (r, worker) = http_call(s, method, "/sleep?ms=1");
            assert_eq!(r.status, 200, "HTTP {name} {method}");
            assert_eq!(
                parent_of(worker),
                new,
                "HTTP {name} {method}\n{}",
                log_text()
            );
        }
    }
    for (name, s) in [("idle", &mut fidle), ("busy", &mut fbusy)] {
        for method in ["POST", "GET"] {
            fcgi_send(s, method, "/sleep?ms=1");
            let (text, worker) = fcgi_answer(s);
            assert!(
                text.contains("slept 1 ms"),
                "FastCGI {name} {method}: {text}"
            );
            assert_eq!(
                parent_of(worker),
                new,
                "FastCGI {name} {method}\n{}",
                log_text()
            );
        }
    }
    for s in &mut many {
        let (r, worker) = http_call(s, "POST", "/sleep?ms=0");
        assert_eq!((r.status, parent_of(worker)), (200, new));
    }
    assert!(
        log_text().contains(&format!("adopted={}", MANY + 4)),
        "the new process says how many it took:\n{}",
        log_text()
    );
    a.stop();
}

/// With `--proxy-protocol`, the client a connection's PROXY header named goes with the connection to the new
/// process, which does not wait for a header again: the next request on it still comes from that client.
#[test]
fn an_upgrade_hands_over_proxied_connections_with_their_client() {
    let addr: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    let listen = addr.to_string();
    let mut a = Installed::start(&[
        "--listen",
        &listen,
        "--proxy-protocol",
        "--trusted-proxy",
        "127.0.0.1",
        "--admin",
        "off",
    ]);
    let proxied = || -> std::io::Result<std::net::TcpStream> {
        let mut s = std::net::TcpStream::connect(addr)?;
        s.set_read_timeout(Some(Duration::from_secs(30)))?;
        s.write_all(b"PROXY TCP4 203.0.113.7 127.0.0.1 4242 80\r\n")?;
        Ok(s)
    };
    let env = |s: &mut std::net::TcpStream| {
        s.write_all(b"GET /env HTTP/1.1\r\nHost: t\r\n\r\n")?;
        common::read_response(s)
    };
    wait_until("anteroom to serve", Duration::from_secs(20), || {
        proxied()
            .and_then(|mut s| env(&mut s))
            .is_ok_and(|r| r.status == 200)
    });
    let mut s = proxied().unwrap();
    let r = env(&mut s).unwrap();
    assert!(r.text().contains("REMOTE_ADDR=203.0.113.7"), "{}", r.text());
    let new = a.upgrade();
    assert!(a.first_exited_well());
    let log_text = || a.log_text();
    let r = env(&mut s).unwrap();
    assert_eq!(r.status, 200, "{}", r.text());
    assert!(
        r.text().contains("REMOTE_ADDR=203.0.113.7") && r.text().contains("REMOTE_PORT=4242"),
        "{}",
        r.text()
    );
    let (_, worker) = http_call(&mut s, "GET", "/sleep?ms=1");
    assert_eq!(parent_of(worker), new, "{}", log_text());
    wait_until(
        "the new process to say what it adopted",
        Duration::from_secs(5),
        || log_text().contains("adopted="),
    );
    assert!(log_text().contains("adopted=1"), "{}", log_text());
    a.stop();
}
