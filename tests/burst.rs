//! The founding measurement: a burst of requests through nginx into anteroom, with a small kernel backlog.
//!
//! Everything runs in a network namespace made for the test, with `net.core.somaxconn = 128` (the old
//! kernel default, which also caps anteroom's unix listening socket). nginx listens on 127.0.0.1:PORT
//! inside it and proxies to anteroom over a unix socket; anteroom runs the PHP example app (`?ms=100`)
//! on 5 php-cgi workers; oha sends 1000 requests, 300 at a time.
//!
//! An application server that leaves waiting requests in the kernel's backlog overflows it at once (a
//! unix socket whose backlog is full refuses nginx's connect with EAGAIN, and nginx answers 502). anteroom
//! accepts every connection at once and holds the requests in its own queue, so:
//!
//! * with the default queue (4096), every request is answered 200;
//! * with `--max-queue 100`, the overflow is refused on purpose with 503 and a `Retry-After`, never 502.
//!
//! Needs root (network namespaces), `ip`, `sysctl`, `kill`, nginx, php-cgi and oha: run it through
//! scripts/test, which provides them. Nothing here is timed: the machine may be a shared 2-core box.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::fs;
use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;
use std::thread::sleep;
use std::time::{Duration, Instant};

/// The two bursts must not overlap: each wants both cores.
static SERIAL: Mutex<()> = Mutex::new(());
static RUN: AtomicUsize = AtomicUsize::new(0);

const NGINX_CONF: &str = include_str!("fixtures/burst-nginx.conf.in");

/// Each run has a namespace of its own, hence a port space of its own: a fixed port cannot clash.
const PORT: u16 = 8080;
const WORKERS: usize = 5;
const REQUESTS: u64 = 1000;
const CONCURRENCY: u64 = 300;
const SOMAXCONN: u32 = 128;
/// Longer than the slowest full drain of the queue could take (1000 x 100 ms / 5 workers = 20 s, on an idle
/// machine): a request must never be refused because the machine is slow, only because the queue is full.
const QUEUE_TIMEOUT_SECS: u32 = 120;
/// oha's limit per request, above anteroom's queue timeout and below nginx's proxy_read_timeout.
const OHA_REQUEST_TIMEOUT: &str = "150s";
/// The whole oha run, as a last resort against a hang.
const OHA_RUN_LIMIT: Duration = Duration::from_secs(600);
const READY_LIMIT: Duration = Duration::from_secs(30);

const LOAD_PATH: &str = "/?ms=100";

/// What one burst sends, and anteroom's options beyond the rig's.
struct Load {
    requests: u64,
    concurrency: u64,
    path: &'static str,
    args: Vec<String>,
}

impl Load {
    /// The founding burst: 1000 requests, 300 at a time, 100 ms each.
    fn founding(args: &[&str]) -> Load {
        Load {
            requests: REQUESTS,
            concurrency: CONCURRENCY,
            path: LOAD_PATH,
            args: args.iter().map(ToString::to_string).collect(),
        }
    }
}
const PROBE_PATH: &str = "/?ms=0&probe=1";

fn serial() -> std::sync::MutexGuard<'static, ()> {
    // A failed burst poisons the lock; the next one can run all the same.
    SERIAL.lock().unwrap_or_else(|e| e.into_inner())
}

#[test]
fn burst_all_answered() {
    let _serial = serial();
    let b = run_burst("burst_all_answered", &Load::founding(&[]));

    let mut failures = Vec::new();
    check(
        &mut failures,
        b.oha_status.get(&200).copied().unwrap_or(0) == REQUESTS,
        format!(
            "oha: expected {REQUESTS} responses 200, got {:?}",
            b.oha_status
        ),
    );
    check_no_502_nor_errors(&mut failures, &b);
    let not_200: Vec<&LogLine> = b.log.iter().filter(|l| l.status != "200").collect();
    check(
        &mut failures,
        not_200.is_empty(),
        format!(
            "nginx access log: {} lines are not 200: {:?}",
            not_200.len(),
            count_by(not_200.iter().map(|l| l.status.as_str()))
        ),
    );
    b.finish(failures);
}

/// Issue 13's misfire, as the full bench run met it: a closed-loop burst of 5000 requests from 1000 clients
/// through nginx, whose listen backlog (somaxconn 128) drops SYNs that are retried 1 s and 3 s later, with
/// the controlled delay on. Its queue stands at about 1000 (4 s for a new request, above the 1 s target)
/// but stops growing once the clients are in: a burst, to be absorbed whole, never taken for overload.
#[test]
fn burst_of_1000_clients_with_controlled_delay_is_absorbed_whole() {
    let _serial = serial();
    let load = Load {
        requests: 5000,
        concurrency: 1000,
        path: "/?ms=20",
        args: vec!["--queue-target".into(), "1".into()],
    };
    let b = run_burst(
        "burst_of_1000_clients_with_controlled_delay_is_absorbed_whole",
        &load,
    );
    let mut failures = Vec::new();
    check(
        &mut failures,
        b.oha_count(200) == load.requests,
        format!(
            "oha: expected {} responses 200, got {:?}",
            load.requests, b.oha_status
        ),
    );
    check_no_502_nor_errors(&mut failures, &b);
    let overloaded = b
        .rig
        .read("anteroom.log")
        .lines()
        .filter(|l| l.contains("queue overloaded"))
        .count();
    check(
        &mut failures,
        overloaded == 0,
        format!("anteroom entered overload {overloaded} time(s) during a burst"),
    );
    b.finish(failures);
}

/// What both bursts must show: nginx handed every request to anteroom, every one got an HTTP answer,
/// and nginx logged each.
fn check_no_502_nor_errors(failures: &mut Vec<String>, b: &Burst) {
    check(
        failures,
        b.log.len() as u64 == b.requests,
        format!(
            "nginx access log: expected {} lines, got {}",
            b.requests,
            b.log.len()
        ),
    );
    check(
        failures,
        b.oha_count(502) == 0,
        format!(
            "oha: {} responses 502 (nginx could not hand them to anteroom)",
            b.oha_count(502)
        ),
    );
    check(
        failures,
        b.oha_errors.is_empty(),
        format!("oha: errors {:?}", b.oha_errors),
    );
}

#[test]
fn burst_with_small_queue_refuses_with_503() {
    const MAX_QUEUE: u64 = 100;
    let _serial = serial();
    let b = run_burst(
        "burst_with_small_queue_refuses_with_503",
        &Load::founding(&["--max-queue", &MAX_QUEUE.to_string()]),
    );

    let mut failures = Vec::new();
    let ok = b.oha_count(200);
    let refused = b.oha_count(503);
    check_no_502_nor_errors(&mut failures, &b);
    check(
        &mut failures,
        ok + refused == REQUESTS,
        format!(
            "oha: expected {REQUESTS} responses, all 200 or 503, got {:?}",
            b.oha_status
        ),
    );
    // 300 at once against 5 workers and 100 places: the queue must overflow.
    check(
        &mut failures,
        refused > 0,
        format!("oha: no 503 at all, although {CONCURRENCY} concurrent requests cannot fit {MAX_QUEUE} queue places and {WORKERS} workers"),
    );
    // The queue starts empty, so its first MAX_QUEUE requests are admitted, and an admitted request is
    // served (the queue timeout is far longer than the queue takes to drain).
    check(
        &mut failures,
        ok >= MAX_QUEUE,
        format!(
            "oha: only {ok} responses 200; at least the first {MAX_QUEUE} requests fit the queue"
        ),
    );
    let odd: Vec<&LogLine> = b
        .log
        .iter()
        .filter(|l| l.status != "200" && l.status != "503")
        .collect();
    check(
        &mut failures,
        odd.is_empty(),
        format!(
            "nginx access log: {} lines neither 200 nor 503: {:?}",
            odd.len(),
            count_by(odd.iter().map(|l| l.status.as_str()))
        ),
    );
    let refusals: Vec<&LogLine> = b.log.iter().filter(|l| l.status == "503").collect();
    check(
        &mut failures,
        refusals.len() as u64 == refused,
        format!(
            "nginx access log has {} lines 503, oha counted {refused}",
            refusals.len()
        ),
    );
    let bare: Vec<&LogLine> = refusals
        .iter()
        .copied()
        .filter(|l| l.retry_after.is_empty() || l.retry_after == "-")
        .collect();
    check(
        &mut failures,
        bare.is_empty(),
        format!(
            "nginx access log: {} of {} lines 503 carry no Retry-After from anteroom, e.g. {:?}",
            bare.len(),
            refusals.len(),
            bare.first().map(|l| &l.raw)
        ),
    );
    println!(
        "  Retry-After values on the 503s (seconds: count): {:?}",
        count_by(refusals.iter().map(|l| l.retry_after.as_str()))
    );
    b.finish(failures);
}

fn check(failures: &mut Vec<String>, ok: bool, what: String) {
    if !ok {
        failures.push(what);
    }
}

// ---------------------------------------------------------------------------------------------------
// The tools

struct Tools {
    ip: PathBuf,
    sysctl: PathBuf,
    kill: PathBuf,
    nginx: PathBuf,
    php_cgi: PathBuf,
    oha: PathBuf,
}

impl Tools {
    fn find() -> Tools {
        let home_cargo = std::env::var_os("HOME")
            .map(|h| PathBuf::from(h).join(".cargo/bin"))
            .unwrap_or_default();
        Tools {
            ip: tool(
                "ip",
                "iproute2",
                &["/usr/sbin", "/sbin", "/usr/bin", "/bin"],
            ),
            sysctl: tool("sysctl", "procps", &["/usr/sbin", "/sbin"]),
            kill: tool("kill", "procps", &["/usr/bin", "/bin"]),
            nginx: tool("nginx", "nginx", &["/usr/sbin", "/usr/local/sbin"]),
            php_cgi: tool("php-cgi", "php-cgi", &["/usr/bin", "/usr/local/bin"]),
            oha: tool(
                "oha",
                "cargo install oha",
                &[home_cargo.to_str().unwrap_or("")],
            ),
        }
    }
}

/// An executable named `name` on PATH or in one of `extra`; a missing one fails the test, never skips it.
fn tool(name: &str, from: &str, extra: &[&str]) -> PathBuf {
    let path = std::env::var_os("PATH").unwrap_or_default();
    let dirs = std::env::split_paths(&path).chain(extra.iter().map(PathBuf::from));
    for dir in dirs {
        let candidate = dir.join(name);
        if is_executable(&candidate) {
            return candidate;
        }
    }
    panic!(
        "tests/burst.rs needs `{name}` (from {from}), which is not on PATH nor in {extra:?}. \
         Run the tests with scripts/test, which installs and checks what they need."
    );
}

fn is_executable(p: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    fs::metadata(p)
        .map(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
        .unwrap_or(false)
}

// ---------------------------------------------------------------------------------------------------
// The rig: a namespace with anteroom and nginx in it, torn down by Drop whatever happens

struct Rig {
    name: &'static str,
    tools: Tools,
    ns: String,
    ns_made: bool,
    dir: Option<tempfile::TempDir>,
    nginx: Option<Child>,
    anteroom: Option<Child>,
}

impl Rig {
    fn dir(&self) -> &Path {
        self.dir.as_ref().expect("the temporary directory").path()
    }

    fn path(&self, file: &str) -> PathBuf {
        self.dir().join(file)
    }

    /// `ip netns exec NS program args...`; ip execs the program, so the child's pid is the program's.
    fn in_ns(&self, program: &Path) -> Command {
        let mut c = Command::new(&self.tools.ip);
        c.arg("netns").arg("exec").arg(&self.ns).arg(program);
        c.stdin(Stdio::null());
        c
    }

    fn ip(&self, args: &[&str]) {
        let out = Command::new(&self.tools.ip)
            .args(args)
            .stdin(Stdio::null())
            .output()
            .unwrap_or_else(|e| panic!("cannot run {}: {e}", self.tools.ip.display()));
        assert!(
            out.status.success(),
            "`ip {}` failed ({}): {}\nThis test needs root for network namespaces: run it with scripts/test.",
            args.join(" "),
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }

    fn log_file(&self, file: &str) -> Stdio {
        Stdio::from(
            fs::File::create(self.path(file))
                .unwrap_or_else(|e| panic!("cannot create {file}: {e}")),
        )
    }

    fn read(&self, file: &str) -> String {
        fs::read(self.path(file))
            .map(|b| String::from_utf8_lossy(&b).into_owned())
            .unwrap_or_default()
    }

    /// Panics with the program's log if it has exited.
    fn check_alive(child: &mut Option<Child>, what: &str, log: &str) {
        if let Some(c) = child.as_mut() {
            if let Ok(Some(st)) = c.try_wait() {
                panic!("{what} exited early ({st}); its log:\n{}", tail(log, 40));
            }
        }
    }

    /// SIGTERM, a grace period, then SIGKILL.
    fn stop(&self, mut child: Child, what: &str) {
        if let Ok(Some(_)) = child.try_wait() {
            return;
        }
        let _ = Command::new(&self.tools.kill)
            .arg("-TERM")
            .arg(child.id().to_string())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
        let deadline = Instant::now() + Duration::from_secs(15);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = child.try_wait() {
                return;
            }
            sleep(Duration::from_millis(50));
        }
        eprintln!("{}: {what} did not stop on SIGTERM; SIGKILL", self.name);
        let _ = child.kill();
        let _ = child.wait();
    }
}

impl Drop for Rig {
    fn drop(&mut self) {
        // nginx first, so that nothing new reaches anteroom while it stops.
        if let Some(c) = self.nginx.take() {
            self.stop(c, "nginx");
        }
        if let Some(c) = self.anteroom.take() {
            self.stop(c, "anteroom");
        }
        if self.ns_made {
            // Anything of ours still in the namespace (a php-cgi, an oha that hung): it goes too.
            if let Ok(out) = Command::new(&self.tools.ip)
                .args(["netns", "pids", &self.ns])
                .stdin(Stdio::null())
                .stderr(Stdio::null())
                .output()
            {
                for pid in String::from_utf8_lossy(&out.stdout).split_whitespace() {
                    let _ = Command::new(&self.tools.kill)
                        .args(["-KILL", pid])
                        .stdin(Stdio::null())
                        .stderr(Stdio::null())
                        .status();
                }
            }
            let _ = Command::new(&self.tools.ip)
                .args(["netns", "del", &self.ns])
                .stdin(Stdio::null())
                .status();
        }
        if let Some(dir) = self.dir.take() {
            // Kept when a test failed, and when asked for its debug log.
            if std::thread::panicking() || std::env::var_os("BURST_ANTEROOM_LOG").is_some() {
                let kept = dir.keep();
                eprintln!(
                    "{}: logs kept in {} (anteroom.log, error.log, access.log, oha.json)",
                    self.name,
                    kept.display()
                );
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------------
// One burst

struct LogLine {
    status: String,
    retry_after: String,
    raw: String,
}

struct Burst {
    name: &'static str,
    rig: Rig,
    oha_status: BTreeMap<u16, u64>,
    oha_errors: BTreeMap<String, u64>,
    requests: u64,
    /// The access log's lines for the load's requests (not the readiness probes').
    log: Vec<LogLine>,
}

impl Burst {
    fn oha_count(&self, status: u16) -> u64 {
        self.oha_status.get(&status).copied().unwrap_or(0)
    }

    /// Reports the failures with what helps to explain them, then tears the rig down.
    fn finish(self, failures: Vec<String>) {
        if failures.is_empty() {
            println!("{}: passed", self.name);
            return;
        }
        let mut msg = format!("{}: {} check(s) failed:\n", self.name, failures.len());
        for f in &failures {
            let _ = writeln!(msg, "  - {f}");
        }
        let errors = self.rig.read("error.log");
        let _ = writeln!(
            msg,
            "nginx error.log ({} lines), last lines:\n{}",
            errors.lines().count(),
            tail(&errors, 10)
        );
        let anteroom = self.rig.read("anteroom.log");
        let notable: Vec<&str> = anteroom
            .lines()
            .filter(|l| !l.contains("queue full: refused with 503"))
            .collect();
        let _ = writeln!(
            msg,
            "anteroom log without the 'queue full' lines, last lines:\n{}",
            tail(&notable.join("\n"), 30)
        );
        // Panics with the rig still alive; its Drop runs during the unwind and keeps the logs.
        panic!("{msg}");
    }
}

#[allow(
    clippy::too_many_lines,
    reason = "one end-to-end scenario (namespace, nginx, workers, load, counts), read top to bottom"
)]
fn run_burst(name: &'static str, load: &Load) -> Burst {
    let tools = Tools::find();
    let app = Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/php/index.php");
    assert!(
        app.is_file(),
        "the PHP example app is missing: {}",
        app.display()
    );

    let run = RUN.fetch_add(1, Ordering::Relaxed);
    let dir = tempfile::Builder::new()
        .prefix("burst-")
        .tempdir()
        .expect("a temporary directory");
    let mut rig = Rig {
        name,
        tools,
        ns: format!("anteroom-burst-{}-{run}", std::process::id()),
        ns_made: false,
        dir: Some(dir),
        nginx: None,
        anteroom: None,
    };
    let sock = rig.path("anteroom.sock");
    assert!(
        sock.as_os_str().len() < 100,
        "the unix socket path {} is too long for sun_path; set TMPDIR to a shorter directory",
        sock.display()
    );

    // The namespace.
    rig.ip(&["netns", "add", &rig.ns]);
    rig.ns_made = true;
    let out = rig
        .in_ns(&rig.tools.sysctl)
        .args(["-w", &format!("net.core.somaxconn={SOMAXCONN}")])
        .output()
        .expect("cannot run sysctl");
    assert!(
        out.status.success(),
        "sysctl -w net.core.somaxconn={SOMAXCONN} in the namespace failed: {}",
        String::from_utf8_lossy(&out.stderr).trim()
    );
    rig.ip(&["-n", &rig.ns, "link", "set", "lo", "up"]);

    // anteroom.
    let mut cmd = rig.in_ns(Path::new(env!("CARGO_BIN_EXE_anteroom")));
    cmd.arg("--listen")
        .arg(format!("unix:{}", sock.display()))
        .args(["--workers", &WORKERS.to_string()])
        .args(["--queue-timeout", &QUEUE_TIMEOUT_SECS.to_string()])
        .args(["--env", "PHP_FCGI_MAX_REQUESTS=0"])
        .arg("--param")
        .arg(format!("SCRIPT_FILENAME={}", app.display()));
    cmd.args(&load.args);
    cmd.arg("--").arg(&rig.tools.php_cgi);
    // One file for both streams, in order (anteroom logs to stderr; its workers' output is relayed there).
    let log = fs::File::create(rig.path("anteroom.log")).expect("cannot create anteroom.log");
    // BURST_ANTEROOM_LOG sets anteroom's log filter, e.g. `anteroom::queue::delay=debug` to see the
    // controlled delay judge the queue's growth.
    match std::env::var("BURST_ANTEROOM_LOG") {
        Ok(filter) => cmd.env("ANTEROOM_LOG", filter),
        Err(_) => cmd.env_remove("ANTEROOM_LOG"),
    };
    cmd.stdout(Stdio::from(log.try_clone().expect("dup anteroom.log")))
        .stderr(Stdio::from(log));
    rig.anteroom = Some(cmd.spawn().expect("cannot start anteroom"));
    wait_for_anteroom(&mut rig, &sock);

    // nginx.
    let conf = NGINX_CONF
        .replace("@DIR@", &rig.dir().display().to_string())
        .replace("@PORT@", &PORT.to_string())
        .replace("@SOCK@", &sock.display().to_string());
    fs::write(rig.path("nginx.conf"), conf).expect("cannot write nginx.conf");
    let mut cmd = rig.in_ns(&rig.tools.nginx);
    cmd.arg("-p")
        .arg(rig.dir())
        .arg("-e")
        .arg(rig.path("error.log"))
        .arg("-c")
        .arg(rig.path("nginx.conf"))
        .stdout(rig.log_file("nginx.out"))
        .stderr(rig.log_file("nginx.err"));
    rig.nginx = Some(cmd.spawn().expect("cannot start nginx"));
    wait_for_nginx(&mut rig);

    // The burst.
    let url = format!("http://127.0.0.1:{PORT}{}", load.path);
    let started = Instant::now();
    let json = oha(
        &rig,
        &[
            "-n",
            &load.requests.to_string(),
            "-c",
            &load.concurrency.to_string(),
        ],
        &url,
        "oha.json",
        OHA_RUN_LIMIT,
    );
    let wall = started.elapsed();
    let (oha_status, oha_errors) = oha_counts(&json);
    let oha_total = json["summary"]["total"].as_f64().unwrap_or(f64::NAN);

    let log = load_lines(&rig, load);
    let anteroom_log = rig.read("anteroom.log");
    let nginx_errors = rig.read("error.log");

    println!(
        "{name}: {} requests, {} at a time, through nginx to anteroom \
         ({WORKERS} php-cgi workers, {}, options {:?}, queue-timeout {QUEUE_TIMEOUT_SECS}s, somaxconn {SOMAXCONN})",
        load.requests,
        load.concurrency,
        load.path,
        load.args,
    );
    let other: u64 = oha_status
        .iter()
        .filter(|(s, _)| ![200, 502, 503].contains(*s))
        .map(|(_, n)| n)
        .sum();
    println!(
        "  oha: 200: {}  503: {}  502: {}  other statuses: {other}  errors: {}  wall time: {:.2} s (oha's own: {oha_total:.2} s)",
        oha_status.get(&200).copied().unwrap_or(0),
        oha_status.get(&503).copied().unwrap_or(0),
        oha_status.get(&502).copied().unwrap_or(0),
        oha_errors.values().sum::<u64>(),
        wall.as_secs_f64(),
    );
    if !oha_errors.is_empty() {
        println!("  oha errors: {oha_errors:?}");
    }
    println!(
        "  nginx access log: {} lines, by status: {:?}",
        log.len(),
        count_by(log.iter().map(|l| l.status.as_str()))
    );
    let eagain = nginx_errors
        .lines()
        .filter(|l| l.contains("Resource temporarily unavailable"))
        .count();
    println!(
        "  nginx error log: {} lines, of which {eagain} 'connect() ... failed (11: Resource temporarily unavailable)'",
        nginx_errors.lines().count()
    );
    let count = |pat: &str| anteroom_log.lines().filter(|l| l.contains(pat)).count();
    println!(
        "  anteroom log: {} lines: {} ERROR, {} WARN, {} 'queue full', {} 'worker exited', {} 'worker started'",
        anteroom_log.lines().count(),
        count(" ERROR "),
        count(" WARN "),
        count("queue full: refused with 503"),
        count("worker exited"),
        count("worker started"),
    );
    for l in anteroom_log
        .lines()
        .filter(|l| l.contains(" ERROR ") || l.contains("worker exited"))
        .take(5)
    {
        println!("    {l}");
    }

    Burst {
        name,
        rig,
        oha_status,
        oha_errors,
        requests: load.requests,
        log,
    }
}

/// Until a request sent straight to anteroom's socket is answered 200 by the PHP app.
fn wait_for_anteroom(rig: &mut Rig, sock: &Path) {
    let deadline = Instant::now() + READY_LIMIT;
    let mut last;
    loop {
        let log = rig.read("anteroom.log");
        Rig::check_alive(&mut rig.anteroom, "anteroom", &log);
        match probe_unix(sock) {
            Ok(head) if head.starts_with("HTTP/1.1 200") || head.starts_with("HTTP/1.0 200") => {
                return
            }
            Ok(head) => last = format!("answered {head:?}"),
            Err(e) => last = e.to_string(),
        }
        if Instant::now() > deadline {
            panic!(
                "anteroom did not answer 200 on {} within {READY_LIMIT:?}: last attempt: {last}\nits log:\n{}",
                sock.display(),
                tail(&rig.read("anteroom.log"), 40)
            );
        }
        sleep(Duration::from_millis(100));
    }
}

/// One HTTP/1.0 request on the unix socket; the response's first line.
fn probe_unix(sock: &Path) -> std::io::Result<String> {
    let mut s = UnixStream::connect(sock)?;
    s.set_read_timeout(Some(Duration::from_secs(10)))?;
    s.set_write_timeout(Some(Duration::from_secs(10)))?;
    write!(s, "GET {PROBE_PATH} HTTP/1.0\r\nHost: burst\r\n\r\n")?;
    let mut resp = Vec::new();
    s.read_to_end(&mut resp)?;
    let text = String::from_utf8_lossy(&resp);
    Ok(text.lines().next().unwrap_or("").to_string())
}

/// Until nginx, from inside the namespace, answers a request 200 (through anteroom).
fn wait_for_nginx(rig: &mut Rig) {
    let url = format!("http://127.0.0.1:{PORT}{PROBE_PATH}");
    let deadline = Instant::now() + READY_LIMIT;
    loop {
        let log = rig.read("error.log") + &rig.read("nginx.err");
        Rig::check_alive(&mut rig.nginx, "nginx", &log);
        let json = oha(
            rig,
            &["-n", "1", "-c", "1"],
            &url,
            "probe.json",
            READY_LIMIT,
        );
        let (status, errors) = oha_counts(&json);
        if status.get(&200) == Some(&1) {
            return;
        }
        if Instant::now() > deadline {
            panic!(
                "nginx did not answer 200 on 127.0.0.1:{PORT} within {READY_LIMIT:?}: \
                 last probe: statuses {status:?}, errors {errors:?}\nerror.log:\n{}",
                tail(&rig.read("error.log"), 20)
            );
        }
        sleep(Duration::from_millis(100));
    }
}

/// Runs oha inside the namespace and returns its JSON report.
fn oha(rig: &Rig, load: &[&str], url: &str, out: &str, limit: Duration) -> serde_json::Value {
    let out_path = rig.path(out);
    let err_name = format!("{out}.stderr");
    let mut child = rig
        .in_ns(&rig.tools.oha)
        .args(load)
        .args([
            "--no-tui",
            "--output-format",
            "json",
            "-t",
            OHA_REQUEST_TIMEOUT,
        ])
        .arg(url)
        .stdout(rig.log_file(out))
        .stderr(rig.log_file(&err_name))
        .spawn()
        .expect("cannot start oha");
    let deadline = Instant::now() + limit;
    let status = loop {
        if let Some(st) = child.try_wait().expect("waiting for oha") {
            break st;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("oha {load:?} {url} did not finish within {limit:?}");
        }
        sleep(Duration::from_millis(50));
    };
    let text = fs::read_to_string(&out_path).unwrap_or_default();
    assert!(
        status.success(),
        "oha {load:?} {url} failed ({status}): {}",
        rig.read(&err_name).trim()
    );
    serde_json::from_str(&text).unwrap_or_else(|e| {
        panic!(
            "oha's output is not the JSON expected ({e}); is oha too old for --output-format json? \
             scripts/test installs a suitable one. Output: {}",
            tail(&text, 10)
        )
    })
}

/// oha's counts by status code and by error.
fn oha_counts(json: &serde_json::Value) -> (BTreeMap<u16, u64>, BTreeMap<String, u64>) {
    let statuses = json["statusCodeDistribution"]
        .as_object()
        .unwrap_or_else(|| panic!("oha's JSON has no statusCodeDistribution object: {json}"));
    let errors = json["errorDistribution"]
        .as_object()
        .unwrap_or_else(|| panic!("oha's JSON has no errorDistribution object: {json}"));
    let status = statuses
        .iter()
        .map(|(k, v)| {
            (
                k.parse::<u16>().expect("a status code"),
                v.as_u64().expect("a count"),
            )
        })
        .collect();
    let errors = errors
        .iter()
        .map(|(k, v)| (k.clone(), v.as_u64().expect("a count")))
        .collect();
    (status, errors)
}

/// The access log's lines for the load's requests. nginx writes a line just after the response has gone,
/// so the last ones may trail oha's exit by a moment: wait (briefly) until all are there.
fn load_lines(rig: &Rig, load: &Load) -> Vec<LogLine> {
    let request = format!("GET {} ", load.path);
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let text = rig.read("access.log");
        let lines: Vec<LogLine> = text
            .lines()
            .filter(|l| l.contains(&request))
            .map(|l| {
                let fields: Vec<&str> = l.split('|').collect();
                LogLine {
                    status: fields.first().unwrap_or(&"").to_string(),
                    retry_after: fields.get(1).unwrap_or(&"").to_string(),
                    raw: l.to_string(),
                }
            })
            .collect();
        if lines.len() as u64 >= load.requests || Instant::now() > deadline {
            return lines;
        }
        sleep(Duration::from_millis(100));
    }
}

fn count_by<'a>(items: impl Iterator<Item = &'a str>) -> BTreeMap<String, usize> {
    let mut m = BTreeMap::new();
    for i in items {
        *m.entry(i.to_string()).or_insert(0) += 1;
    }
    m
}

fn tail(text: &str, n: usize) -> String {
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}
