//! Least privilege, against the real binary and real workers (these tests run as root, as CI does):
//! `--user` and `--group` (read back from the workers' /proc/PID/status), `--worker-rlimit`
//! (/proc/PID/limits), `--clear-env` and `--pass-env` (/proc/PID/environ), `--drop-privileges` (anteroom's
//! own status), the modes of the unix sockets anteroom makes, and refusals at start.
//!
//! The test account is a system user made once (idempotently) with a supplementary group, so that
//! initgroups can be seen to work. /work may not be readable by it, so each test runs a copy of the binary
//! (and its fixture) from a temp directory that everyone may traverse.

mod common;

use std::io::{Read, Write};
use std::net::SocketAddr;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Once;
use std::time::{Duration, Instant};

use common::{children, free_port, request, wait_timeout, wait_until, Response, BIN};

const USER: &str = "anteroom-test";
const EXTRA_GROUP: &str = "anteroom-test-extra";

/// The test account: (uid, gid, the extra group's gid).
fn account() -> (u32, u32, u32) {
    static MADE: Once = Once::new();
    MADE.call_once(|| {
        let exists = |cmd: &[&str]| {
            Command::new("getent")
                .args(cmd)
                .stdout(Stdio::null())
                .status()
                .is_ok_and(|s| s.success())
        };
        if !exists(&["group", EXTRA_GROUP]) {
            let st = Command::new("groupadd")
                .args(["--system", EXTRA_GROUP])
                .status()
                .expect("groupadd runs");
            // 9: made meanwhile by someone else.
            assert!(st.success() || st.code() == Some(9), "groupadd: {st}");
        }
        if !exists(&["passwd", USER]) {
            let st = Command::new("useradd")
                .args([
                    "--system",
                    "--user-group",
                    "--no-create-home",
                    "--home-dir",
                    "/nonexistent",
                    "--shell",
                    "/usr/sbin/nologin",
                    "--groups",
                    EXTRA_GROUP,
                    USER,
                ])
                .status()
                .expect("useradd runs");
            assert!(st.success() || st.code() == Some(9), "useradd: {st}");
        }
    });
    let id = |flag: &str, name: &str| -> u32 {
        let out = Command::new("id").args([flag, name]).output().unwrap();
        String::from_utf8_lossy(&out.stdout).trim().parse().unwrap()
    };
    let extra = Command::new("getent")
        .args(["group", EXTRA_GROUP])
        .output()
        .unwrap();
    let extra: u32 = String::from_utf8_lossy(&extra.stdout)
        .split(':')
        .nth(2)
        .unwrap()
        .parse()
        .unwrap();
    (id("-u", USER), id("-g", USER), extra)
}

/// A directory everyone may traverse, with a copy of the binary in it and a runtime directory for the
/// worker sockets.
struct Sandbox {
    dir: tempfile::TempDir,
}

impl Sandbox {
    fn new() -> Sandbox {
        let dir = tempfile::tempdir().unwrap();
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
        std::fs::copy(BIN, dir.path().join("anteroom")).unwrap();
        std::fs::set_permissions(
            dir.path().join("anteroom"),
            std::fs::Permissions::from_mode(0o755),
        )
        .unwrap();
        std::fs::create_dir(dir.path().join("run")).unwrap();
        std::fs::set_permissions(
            dir.path().join("run"),
            std::fs::Permissions::from_mode(0o755),
        )
        .unwrap();
        Sandbox { dir }
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    fn command(&self) -> Command {
        let mut c = Command::new(self.path("anteroom"));
        c.current_dir(self.dir.path())
            .env("RUNTIME_DIRECTORY", self.path("run"))
            .env("ANTEROOM_LOG", "info");
        c
    }

    /// Starts anteroom with `args` and `env` on a free port and waits for a 200 on `/`.
    fn start(&self, args: &[&str], env: &[(&str, &str)]) -> Running {
        let port = free_port();
        let addr: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
        let log = self.path(&format!("anteroom-{port}.log"));
        let mut cmd = self.command();
        cmd.arg("--listen")
            .arg(addr.to_string())
            .args(["--admin", "off"])
            .args(args)
            .envs(env.iter().copied())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap());
        let child = spawn(&mut cmd);
        let r = Running {
            child: Some(child),
            addr,
            log,
        };
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if r.get("/").is_ok_and(|r| r.status == 200) {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "anteroom did not become ready; log:\n{}",
                r.log_text()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        r
    }

    /// Runs anteroom expecting it to refuse to start: its exit code and stderr.
    fn refused(&self, args: &[&str]) -> (Option<i32>, String) {
        self.refused_as(None, args)
    }

    fn refused_as(&self, user: Option<&str>, args: &[&str]) -> (Option<i32>, String) {
        let mut c = match user {
            Some(u) => {
                let mut c = Command::new("runuser");
                c.args(["-u", u, "--"]).arg(self.path("anteroom"));
                c.current_dir(self.dir.path());
                c
            }
            None => self.command(),
        };
        let port = free_port();
        c.arg("--listen")
            .arg(format!("127.0.0.1:{port}"))
            .args(["--admin", "off"])
            .args(args)
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        for _ in 0..50 {
            let mut child = spawn(&mut c);
            let status = wait_timeout(&mut child, Duration::from_secs(10));
            let mut err = String::new();
            if status.is_none() {
                let _ = child.kill();
                let _ = child.wait();
            }
            child
                .stderr
                .take()
                .unwrap()
                .read_to_string(&mut err)
                .unwrap();
            // runuser could not exec the copy yet (see `spawn`).
            if err.contains("Text file busy") {
                std::thread::sleep(Duration::from_millis(20));
                continue;
            }
            return (status.and_then(|s| s.code()), err);
        }
        panic!("the copy of the binary stayed busy");
    }
}

/// Spawns `c`, again while the kernel says ETXTBSY: the copy of the binary was just written, and a child
/// that another test's thread forked meanwhile may still hold the writing descriptor until it execs.
fn spawn(c: &mut Command) -> Child {
    let mut tries = 0;
    loop {
        match c.spawn() {
            Ok(child) => return child,
            Err(e) if e.kind() == std::io::ErrorKind::ExecutableFileBusy && tries < 50 => {
                tries += 1;
                std::thread::sleep(Duration::from_millis(20));
            }
            Err(e) => panic!("cannot start {:?}: {e}", c.get_program()),
        }
    }
}

struct Running {
    child: Option<Child>,
    addr: SocketAddr,
    log: PathBuf,
}

impl Running {
    fn pid(&self) -> u32 {
        self.child.as_ref().unwrap().id()
    }

    fn get(&self, path: &str) -> std::io::Result<Response> {
        request(
            self.addr,
            format!("GET {path} HTTP/1.1\r\nHost: test\r\nConnection: close\r\n\r\n").as_bytes(),
        )
    }

    fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// The worker processes: anteroom's children, once there are `n`.
    fn workers(&self, n: usize) -> Vec<u32> {
        wait_until("the workers to start", Duration::from_secs(20), || {
            children(self.pid()).len() >= n
        });
        children(self.pid())
    }

    fn stop(&mut self) -> std::process::ExitStatus {
        let mut child = self.child.take().unwrap();
        common::signal(child.id(), common::libc_sigterm());
        wait_timeout(&mut child, Duration::from_secs(40)).expect("anteroom stops after SIGTERM")
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            common::signal(c.id(), common::libc_sigterm());
            if wait_timeout(&mut c, Duration::from_secs(10)).is_none() {
                let _ = c.kill();
                let _ = c.wait();
            }
        }
    }
}

/// A line of /proc/PID/status, such as `Uid:`, as its fields.
fn status_field(pid: u32, field: &str) -> Vec<u32> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let line = status
        .lines()
        .find(|l| l.starts_with(field))
        .unwrap_or_else(|| panic!("no {field} in /proc/{pid}/status"));
    line[field.len()..]
        .split_whitespace()
        .map(|v| v.parse().unwrap())
        .collect()
}

/// /proc/PID/environ as NAME=VALUE strings.
fn environ(pid: u32) -> Vec<String> {
    let raw = std::fs::read(format!("/proc/{pid}/environ")).unwrap();
    raw.split(|b| *b == 0)
        .filter(|v| !v.is_empty())
        .map(|v| String::from_utf8_lossy(v).into_owned())
        .collect()
}

fn has_var(env: &[String], name: &str) -> bool {
    env.iter().any(|v| v.starts_with(&format!("{name}=")))
}

/// The soft and hard limits of a line of /proc/PID/limits, such as "Max open files".
fn limit(pid: u32, name: &str) -> (String, String) {
    let limits = std::fs::read_to_string(format!("/proc/{pid}/limits")).unwrap();
    let line = limits
        .lines()
        .find(|l| l.starts_with(name))
        .unwrap_or_else(|| panic!("no {name} in /proc/{pid}/limits"));
    let f: Vec<&str> = line[name.len()..].split_whitespace().collect();
    (f[0].to_string(), f[1].to_string())
}

/// The worker socket directory anteroom made in `run`.
fn worker_dir(run: &Path) -> PathBuf {
    std::fs::read_dir(run)
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .find(|p| {
            p.file_name()
                .unwrap()
                .to_string_lossy()
                .starts_with("anteroom.")
        })
        .expect("a worker socket directory")
}

#[test]
fn workers_run_as_the_user_with_its_groups_limits_and_a_cleared_env() {
    let (uid, gid, extra) = account();
    let sb = Sandbox::new();
    let a = sb.start(
        &[
            "--workers",
            "2",
            "--user",
            USER,
            "--worker-rlimit",
            "nofile=1000:2000",
            "--worker-rlimit",
            "core=0",
            "--pass-env",
            "PASSED_ON",
            "--env",
            "FROM_FLAG=1",
        ],
        &[("SECRET_TOKEN", "s3cret"), ("PASSED_ON", "yes")],
    );
    let workers = a.workers(2);
    assert_eq!(workers.len(), 2, "{workers:?}");
    for &w in &workers {
        // Real, effective, saved and filesystem ids.
        assert_eq!(status_field(w, "Uid:"), [uid; 4], "worker {w}");
        assert_eq!(status_field(w, "Gid:"), [gid; 4], "worker {w}");
        let groups = status_field(w, "Groups:");
        assert!(
            groups.contains(&extra) && groups.contains(&gid) && !groups.contains(&0),
            "worker {w}: groups {groups:?}"
        );
        assert_eq!(
            limit(w, "Max open files"),
            ("1000".into(), "2000".into()),
            "worker {w}"
        );
        assert_eq!(limit(w, "Max core file size"), ("0".into(), "0".into()));
        // --user clears the environment by default: only PATH, LANG, --pass-env and --env, and the
        // user's HOME, USER and LOGNAME.
        let env = environ(w);
        assert!(!has_var(&env, "SECRET_TOKEN"), "leaked: {env:?}");
        assert!(!has_var(&env, "ANTEROOM_LOG"), "leaked: {env:?}");
        assert!(!has_var(&env, "RUNTIME_DIRECTORY"), "leaked: {env:?}");
        assert!(env.contains(&"PASSED_ON=yes".to_string()), "{env:?}");
        assert!(env.contains(&"FROM_FLAG=1".to_string()), "{env:?}");
        assert!(env.contains(&format!("USER={USER}")), "{env:?}");
        assert!(env.contains(&"HOME=/nonexistent".to_string()), "{env:?}");
        assert!(has_var(&env, "PATH"), "{env:?}");
        eprintln!(
            "worker {w}: Uid {:?} Gid {:?} Groups {:?} nofile {:?} env {env:?}",
            status_field(w, "Uid:"),
            status_field(w, "Gid:"),
            groups,
            limit(w, "Max open files")
        );
    }
    // anteroom itself is still root.
    assert_eq!(status_field(a.pid(), "Uid:"), [0; 4]);
    // The private sockets: a 0700 directory and 0600 sockets, handed to the user.
    let dir = worker_dir(&sb.path("run"));
    let meta = std::fs::metadata(&dir).unwrap();
    assert_eq!(meta.mode() & 0o777, 0o700, "{}", dir.display());
    assert_eq!((meta.uid(), meta.gid()), (uid, gid));
    let sockets: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .collect();
    assert!(!sockets.is_empty());
    for s in &sockets {
        let m = std::fs::metadata(s).unwrap();
        assert_eq!(m.mode() & 0o777, 0o600, "{}", s.display());
        assert_eq!((m.uid(), m.gid()), (uid, gid), "{}", s.display());
    }
    assert_eq!(a.get("/").unwrap().status, 200);
    assert!(
        a.log_text().contains("not passed:") && a.log_text().contains("SECRET_TOKEN"),
        "the log names what workers do not get:\n{}",
        a.log_text()
    );
}

#[test]
fn environment_is_passed_without_user_unless_cleared() {
    let sb = Sandbox::new();
    let env = [("SECRET_TOKEN", "s3cret"), ("PASSED_ON", "yes")];
    // No --user: workers get anteroom's environment, as gunicorn's do, less anteroom's own variables.
    let a = sb.start(&["--workers", "1"], &env);
    let w = a.workers(1)[0];
    let got = environ(w);
    assert!(got.contains(&"SECRET_TOKEN=s3cret".to_string()), "{got:?}");
    assert!(!has_var(&got, "ANTEROOM_LOG"), "{got:?}");
    assert_eq!(status_field(w, "Uid:"), [0; 4]);
    drop(a);
    // --clear-env: only what is named gets through.
    let a = sb.start(
        &["--workers", "1", "--clear-env", "--pass-env", "PASSED_ON"],
        &env,
    );
    let w = a.workers(1)[0];
    let got = environ(w);
    assert!(!has_var(&got, "SECRET_TOKEN"), "{got:?}");
    assert!(got.contains(&"PASSED_ON=yes".to_string()), "{got:?}");
    assert!(has_var(&got, "PATH"), "{got:?}");
    assert!(!has_var(&got, "ANTEROOM_LOG"), "{got:?}");
    drop(a);
    // Named explicitly, even one of anteroom's own variables passes.
    let a = sb.start(&["--workers", "1", "--pass-env", "ANTEROOM_LOG"], &env);
    let got = environ(a.workers(1)[0]);
    assert!(got.contains(&"ANTEROOM_LOG=info".to_string()), "{got:?}");
}

/// An HTTP worker on fd 3 (LISTEN_FDS) that answers with its own ids. In Perl with its core modules only:
/// perl-base is essential on Debian, so it is there, outside any home directory the user cannot read.
const HTTP_APP: &str = r#"
use strict;
use IO::Handle;
die "LISTEN_PID is not mine" unless ($ENV{LISTEN_PID} // "") eq $$;
open(my $l, "+<&=", 3) or die "fd 3: $!";
while (1) {
    accept(my $c, $l) or next;
    $c->autoflush(1);
    while (my $line = <$c>) { last if $line eq "\r\n"; }
    my $gid = (split ' ', $()[0];
    my $body = "uid=$< gid=$gid\n";
    print $c "HTTP/1.1 200 OK\r\nContent-Length: " . length($body) . "\r\nConnection: close\r\n\r\n$body";
    close $c;
}
"#;

#[test]
fn anteroom_drops_its_privileges_and_sockets_get_their_mode() {
    let (uid, gid, extra) = account();
    let sb = Sandbox::new();
    std::fs::write(sb.path("http_app.pl"), HTTP_APP).unwrap();
    let http_sock = sb.path("http.sock");
    let fcgi_sock = sb.path("fcgi.sock");
    let mut a = sb.start(
        &[
            "--workers",
            "1",
            "--user",
            USER,
            "--drop-privileges",
            "--worker-protocol",
            "http",
            "--listen",
            &format!("unix:{}", http_sock.display()),
            "--listen-fastcgi",
            &format!("unix:{}", fcgi_sock.display()),
            "--listen-mode",
            "0660",
            "--listen-group",
            EXTRA_GROUP,
            "--",
            "/usr/bin/perl",
            sb.path("http_app.pl").to_str().unwrap(),
        ],
        &[],
    );
    // anteroom: every id is the user's now.
    assert_eq!(status_field(a.pid(), "Uid:"), [uid; 4]);
    assert_eq!(status_field(a.pid(), "Gid:"), [gid; 4]);
    assert!(status_field(a.pid(), "Groups:").contains(&extra));
    eprintln!(
        "anteroom {}: Uid {:?} Gid {:?} Groups {:?}",
        a.pid(),
        status_field(a.pid(), "Uid:"),
        status_field(a.pid(), "Gid:"),
        status_field(a.pid(), "Groups:")
    );
    // The worker (started through the exec-worker shim) too.
    let w = a.workers(1)[0];
    assert_eq!(status_field(w, "Uid:"), [uid; 4]);
    let body = a.get("/").unwrap().text();
    assert_eq!(body, format!("uid={uid} gid={gid}\n"));
    // The public unix sockets: 0660, anteroom's owner (root, which bound them), nginx's group.
    for s in [&http_sock, &fcgi_sock] {
        let m = std::fs::metadata(s).unwrap();
        assert_eq!(m.mode() & 0o777, 0o660, "{}", s.display());
        assert_eq!((m.uid(), m.gid()), (0, extra), "{}", s.display());
        eprintln!(
            "{}: mode {:o} owner {}:{}",
            s.display(),
            m.mode() & 0o777,
            m.uid(),
            m.gid()
        );
    }
    // And they serve.
    let mut conn = std::os::unix::net::UnixStream::connect(&http_sock).unwrap();
    conn.set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    conn.write_all(b"GET / HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n")
        .unwrap();
    let r = common::read_response(&mut conn).unwrap();
    assert_eq!(r.status, 200);
    // A worker that dies is replaced by anteroom running as the user.
    common::signal(w, 9);
    wait_until("a new worker", Duration::from_secs(20), || {
        a.workers(1).iter().any(|p| *p != w)
    });
    let w2 = a.workers(1)[0];
    assert_eq!(status_field(w2, "Uid:"), [uid; 4]);
    assert!(a.stop().success(), "{}", a.log_text());
}

#[test]
fn refused_at_start_naming_the_key() {
    account();
    let sb = Sandbox::new();
    for (args, key) in [
        (&["--user", "no-such-user-anteroom"][..], "user: no user"),
        (
            &["--user", USER, "--group", "no-such-group"][..],
            "group: no group",
        ),
        (&["--group", USER][..], "group: needs --user"),
        (&["--drop-privileges"][..], "drop-privileges: needs --user"),
        (
            &["--listen-group", "no-such-group"][..],
            "listen-group: no group",
        ),
        (
            &["--listen-owner", "no-such-user"][..],
            "listen-owner: no user",
        ),
        (&["--worker-rlimit", "files=10"][..], "--worker-rlimit"),
        (&["--worker-rlimit", "nofile=lots"][..], "--worker-rlimit"),
        (&["--worker-rlimit", "nofile=10:5"][..], "--worker-rlimit"),
        (&["--listen-mode", "0999"][..], "--listen-mode"),
        (&["--pass-env", "NOT-A-NAME"][..], "pass-env:"),
    ] {
        let (code, err) = sb.refused(args);
        assert_eq!(code, Some(2), "{args:?}: {err}");
        assert!(err.contains(key), "{args:?}: {key} not in {err}");
    }
    // Not root: it cannot become another user, and cannot raise a worker's hard limit.
    let (code, err) = sb.refused_as(Some(USER), &["--user", "root"]);
    assert_eq!(code, Some(2), "{err}");
    assert!(err.contains("user: anteroom runs as uid"), "{err}");
    let (code, err) = sb.refused_as(Some(USER), &["--user", USER, "--group", "root"]);
    assert_eq!(code, Some(2), "{err}");
    assert!(err.contains("group: anteroom runs as uid"), "{err}");
    let (code, err) = sb.refused_as(Some(USER), &["--worker-rlimit", "nofile=unlimited"]);
    assert_eq!(code, Some(2), "{err}");
    assert!(err.contains("worker-rlimit: nofile"), "{err}");
}
