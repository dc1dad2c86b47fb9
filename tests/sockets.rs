//! `anteroom sockets` against listeners whose accept queues the test fills itself (connections it never
//! accepts), checked against the numbers we chose and against what `ss` reports for the same sockets.

use std::io::Read;
use std::net::{SocketAddr, TcpStream};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::process::{Command, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use serde_json::Value;
use socket2::{Domain, SockAddr, Socket, Type};

const BIN: &str = env!("CARGO_BIN_EXE_anteroom");

fn anteroom_sockets(args: &[&str]) -> String {
    let out = Command::new(BIN)
        .arg("sockets")
        .args(args)
        .output()
        .expect("run anteroom sockets");
    assert!(
        out.status.success(),
        "anteroom sockets {args:?}: {}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).expect("UTF-8 output")
}

fn report(args: &[&str]) -> Value {
    let mut argv = vec!["--json"];
    argv.extend_from_slice(args);
    let text = anteroom_sockets(&argv);
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("{e}: {text}"))
}

fn sockets_of(report: &Value) -> &Vec<Value> {
    report["sockets"].as_array().expect("a sockets array")
}

/// The socket at `local` once its queue reaches `queued`: a loopback handshake finishes in the kernel
/// just after `connect` returns, so the last connection may take a moment to land in the queue.
fn wait_for(args: &[&str], local: &str, queued: u64) -> (Value, Value) {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let r = report(args);
        let found = sockets_of(&r).iter().find(|s| s["local"] == local).cloned();
        match found {
            Some(s) if s["queued"] == queued => return (r, s),
            _ if Instant::now() > deadline => panic!("{local} never had {queued} queued: {r}"),
            _ => thread::sleep(Duration::from_millis(50)),
        }
    }
}

/// `ss`'s Recv-Q and Send-Q for the listener at `local`: for a listening socket, waiting connections and
/// backlog. Found by position left of the local address, so it works with and without a Netid column.
fn ss_queue(args: &[&str], local: &str) -> (u64, u64) {
    let out = Command::new("ss")
        .args(args)
        .output()
        .expect("ss is not installed; run scripts/test, which installs iproute2");
    assert!(out.status.success(), "ss {args:?}: {}", out.status);
    let text = String::from_utf8_lossy(&out.stdout);
    for line in text.lines() {
        let cols: Vec<&str> = line.split_whitespace().collect();
        if let Some(i) = cols.iter().position(|c| *c == local) {
            if i >= 2 {
                return (cols[i - 2].parse().unwrap(), cols[i - 1].parse().unwrap());
            }
        }
    }
    panic!("ss {args:?} does not show {local}:\n{text}");
}

fn own_name() -> String {
    std::fs::read_to_string("/proc/self/comm")
        .unwrap()
        .trim_end()
        .to_string()
}

fn somaxconn() -> u64 {
    std::fs::read_to_string("/proc/sys/net/core/somaxconn")
        .unwrap()
        .trim()
        .parse()
        .unwrap()
}

fn tcp_listener(backlog: i32) -> (Socket, SocketAddr) {
    let s = Socket::new(Domain::IPV4, Type::STREAM, None).unwrap();
    s.bind(&"127.0.0.1:0".parse::<SocketAddr>().unwrap().into())
        .unwrap();
    s.listen(backlog).unwrap();
    let addr = s.local_addr().unwrap().as_socket().unwrap();
    (s, addr)
}

fn unix_listener(path: &Path, backlog: i32) -> Socket {
    let s = Socket::new(Domain::UNIX, Type::STREAM, None).unwrap();
    s.bind(&SockAddr::unix(path).unwrap()).unwrap();
    s.listen(backlog).unwrap();
    s
}

#[test]
fn tcp_queue_and_backlog_are_what_we_made_and_what_ss_says() {
    let (_listener, addr) = tcp_listener(7);
    let _waiting: Vec<TcpStream> = (0..5).map(|_| TcpStream::connect(addr).unwrap()).collect();
    let port = addr.port().to_string();
    let local = addr.to_string();

    let (r, s) = wait_for(&["--port", &port], &local, 5);
    assert_eq!(s["kind"], "tcp");
    assert_eq!(s["queued"], 5);
    assert_eq!(s["backlog"], 7);
    assert_eq!(s["fill_percent"], 71);
    assert_eq!(s["clamped"], false);
    assert_eq!(s["pid"], std::process::id());
    assert_eq!(s["process"], own_name());
    assert!(s["inode"].as_u64().is_some_and(|i| i > 0), "{s}");
    // --port shows that port only.
    for other in sockets_of(&r) {
        assert!(
            other["local"]
                .as_str()
                .unwrap()
                .ends_with(&format!(":{port}")),
            "{r}"
        );
    }
    assert_eq!(r["somaxconn"], somaxconn());
    assert!(
        r["listen_overflows"].is_u64() && r["listen_drops"].is_u64(),
        "{r}"
    );

    assert_eq!(ss_queue(&["-ltn"], &local), (5, 7));
}

#[test]
fn unix_queue_and_backlog_are_what_we_made_and_what_ss_says() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("q.sock");
    let _listener = unix_listener(&path, 9);
    let _waiting: Vec<UnixStream> = (0..4)
        .map(|_| UnixStream::connect(&path).unwrap())
        .collect();
    let local = path.to_str().unwrap();

    let (r, s) = wait_for(&["--path", dir.path().to_str().unwrap()], local, 4);
    assert_eq!(sockets_of(&r).len(), 1, "{r}");
    assert_eq!(s["kind"], "unix");
    assert_eq!(s["queued"], 4);
    assert_eq!(s["backlog"], 9);
    assert_eq!(s["fill_percent"], 44);
    assert_eq!(s["pid"], std::process::id());
    assert_eq!(s["process"], own_name());

    assert_eq!(ss_queue(&["-lx"], local), (4, 9));
}

#[test]
fn kind_flags_narrow_the_filters() {
    let dir = tempfile::tempdir().unwrap();
    let _unix = unix_listener(&dir.path().join("k.sock"), 3);
    let (_tcp, addr) = tcp_listener(3);
    let port = addr.port().to_string();
    let path = dir.path().to_str().unwrap();

    let both = report(&["--port", &port, "--path", path]);
    let kinds: Vec<&str> = sockets_of(&both)
        .iter()
        .map(|s| s["kind"].as_str().unwrap())
        .collect();
    assert_eq!(kinds.len(), 2, "{both}");
    assert!(kinds.contains(&"tcp") && kinds.contains(&"unix"), "{both}");
    let tcp_only = report(&["--tcp", "--port", &port, "--path", path]);
    assert_eq!(sockets_of(&tcp_only).len(), 1, "{tcp_only}");
    assert_eq!(sockets_of(&tcp_only)[0]["kind"], "tcp");
    let unix_only = report(&["--unix", "--port", &port, "--path", path]);
    assert_eq!(sockets_of(&unix_only).len(), 1, "{unix_only}");
    assert_eq!(sockets_of(&unix_only)[0]["kind"], "unix");
}

#[test]
fn a_backlog_cut_to_somaxconn_is_marked() {
    let max = somaxconn();
    let (_listener, addr) = tcp_listener(i32::try_from(max + 1000).unwrap_or(i32::MAX));
    let r = report(&["--port", &addr.port().to_string()]);
    let s = sockets_of(&r)
        .iter()
        .find(|s| s["local"] == addr.to_string())
        .unwrap_or_else(|| panic!("{r}"));
    assert_eq!(s["backlog"], max);
    assert_eq!(s["clamped"], true);
}

#[test]
fn the_table_shows_the_socket_and_somaxconn() {
    let (_listener, addr) = tcp_listener(7);
    let _waiting: Vec<TcpStream> = (0..2).map(|_| TcpStream::connect(addr).unwrap()).collect();
    let port = addr.port().to_string();
    let local = addr.to_string();
    wait_for(&["--port", &port], &local, 2);
    let table = anteroom_sockets(&["--port", &port]);
    let lines: Vec<&str> = table.lines().collect();
    assert!(lines[0].starts_with("KIND"), "{table}");
    let row: Vec<&str> = lines
        .iter()
        .find(|l| l.contains(&local))
        .unwrap_or_else(|| panic!("{table}"))
        .split_whitespace()
        .collect();
    assert_eq!(
        row[..5],
        ["tcp", local.as_str(), "2", "7", "28%"],
        "{table}"
    );
    assert_eq!(row[5], std::process::id().to_string());
    let last = lines.last().unwrap();
    assert!(
        last.contains(&format!("somaxconn {}", somaxconn())),
        "{table}"
    );
    assert!(last.contains("ListenOverflows"), "{table}");
    // Without filters, every listener is there, ours among them.
    assert!(anteroom_sockets(&[]).contains(&local));
}

#[test]
fn watch_redraws_with_history_until_stopped() {
    let (_listener, addr) = tcp_listener(7);
    let _waiting = TcpStream::connect(addr).unwrap();
    let mut child = Command::new(BIN)
        .args([
            "sockets",
            "--watch",
            "0.1",
            "--port",
            &addr.port().to_string(),
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    thread::sleep(Duration::from_millis(700));
    child.kill().unwrap();
    child.wait().unwrap();
    let mut out = String::new();
    child
        .stdout
        .take()
        .unwrap()
        .read_to_string(&mut out)
        .unwrap();
    let frames = out.matches("HISTORY").count();
    assert!(frames >= 3, "{out}");
    // Not a terminal: frames follow each other, with no escape codes in a file or a pipe.
    assert!(!out.contains('\x1b'), "{out:?}");
    let last_row = out
        .lines()
        .rfind(|l| l.contains(&addr.to_string()))
        .unwrap_or_else(|| panic!("{out}"));
    assert!(last_row.contains("███ 1"), "{out}");
}

/// A child process killed when the test ends, whatever happens.
struct Killed(std::process::Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// One HTTP/1.0 GET; the status code and the body.
fn http_get(addr: SocketAddr, path: &str) -> std::io::Result<(u16, String)> {
    use std::io::Write;
    let mut s = TcpStream::connect(addr)?;
    s.set_read_timeout(Some(Duration::from_secs(20)))?;
    write!(s, "GET {path} HTTP/1.0\r\nHost: t\r\n\r\n")?;
    let mut text = String::new();
    s.read_to_string(&mut text)?;
    let status = text
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let body = text.split_once("\r\n\r\n").map_or("", |b| b.1).to_string();
    Ok((status, body))
}

fn until_answers(addr: SocketAddr, path: &str, what: &str) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while http_get(addr, path).map_or(true, |r| r.0 != 200) {
        assert!(Instant::now() < deadline, "{what} never answered on {addr}");
        thread::sleep(Duration::from_millis(100));
    }
}

/// The value of `metric` in a scrape for the series whose `local` label is `local`.
fn sample(scrape: &str, metric: &str, local: &str) -> u64 {
    let prefix = format!("{metric}{{");
    scrape
        .lines()
        .find(|l| l.starts_with(&prefix) && l.contains(&format!("local=\"{local}\"")))
        .and_then(|l| l.rsplit(' ').next()?.parse().ok())
        .unwrap_or_else(|| panic!("no {metric} for {local} in:\n{scrape}"))
}

/// `--serve`: gunicorn with one sync worker, busy with a slow request while 20 more connect: its accept queue
/// holds 20 for about 0.7 s, then drains. A scrape afterwards finds the queue empty, as any poll at
/// that moment would, and the max gauge at 20 or more; the next scrape starts a new period, so its max is 0.
#[test]
fn serve_shows_a_burst_that_drained_between_scrapes_and_resets_its_max() {
    const BURST: usize = 20;
    let app = Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/python");
    let port = free_port();
    let gunicorn_addr: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    let _gunicorn = Killed(
        Command::new("gunicorn")
            .args([
                "-w",
                "1",
                "--backlog",
                "64",
                "-b",
                &gunicorn_addr.to_string(),
            ])
            .arg("--chdir")
            .arg(&app)
            .arg("app_wsgi:app")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("gunicorn is not installed; run scripts/test, which installs it"),
    );
    let exporter_addr: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    let _exporter = Killed(
        Command::new(BIN)
            .args(["sockets", "--serve", &exporter_addr.to_string()])
            .args(["--port", &port.to_string()])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    until_answers(gunicorn_addr, "/", "gunicorn");
    until_answers(exporter_addr, "/metrics", "anteroom sockets --serve");
    let local = gunicorn_addr.to_string();
    // A period that starts with the queue empty.
    let (_, before) = http_get(exporter_addr, "/metrics").unwrap();
    assert_eq!(sample(&before, "anteroom_listen_queue", &local), 0);
    assert_eq!(sample(&before, "anteroom_listen_backlog", &local), 64);
    assert!(before.contains("process=\"gunicorn"), "{before}");

    let slow = thread::spawn(move || http_get(gunicorn_addr, "/?ms=900"));
    // The worker has taken the slow request.
    thread::sleep(Duration::from_millis(150));
    let started = Instant::now();
    let burst: Vec<_> = (0..BURST)
        .map(|_| thread::spawn(move || http_get(gunicorn_addr, "/")))
        .collect();
    for b in burst {
        assert_eq!(b.join().unwrap().unwrap().0, 200);
    }
    assert_eq!(slow.join().unwrap().unwrap().0, 200);
    let lasted = started.elapsed();
    // Every connection of the burst was accepted and answered: the queue is empty again.
    let (_, first) = http_get(exporter_addr, "/metrics").unwrap();
    assert_eq!(
        sample(&first, "anteroom_listen_queue", &local),
        0,
        "{first}"
    );
    let max = sample(&first, "anteroom_listen_queue_max", &local);
    assert!(
        max >= BURST as u64,
        "max {max} after a burst of {BURST} that lasted {lasted:?}:\n{first}"
    );
    assert!(
        first.contains("anteroom_kernel_listen_overflows_total "),
        "{first}"
    );
    let (_, second) = http_get(exporter_addr, "/metrics").unwrap();
    assert_eq!(
        sample(&second, "anteroom_listen_queue_max", &local),
        0,
        "{second}"
    );
}
