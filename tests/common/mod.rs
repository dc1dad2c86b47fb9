//! What the integration tests share: start the real anteroom binary, speak raw HTTP to it, stop it.
#![allow(dead_code)]

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub const BIN: &str = env!("CARGO_BIN_EXE_anteroom");

/// The binary under test where a test lets it be another (`ANTEROOM_BIN`), else this crate's.
pub fn anteroom_bin() -> PathBuf {
    std::env::var_os("ANTEROOM_BIN").map_or_else(|| PathBuf::from(BIN), PathBuf::from)
}

pub fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// Fails (never skips) when a peer the tests need is missing: scripts/test installs them all.
pub fn require(cmd: &str) {
    let ok = Command::new("sh")
        .arg("-c")
        .arg(format!("command -v {cmd}"))
        .stdout(Stdio::null())
        .status()
        .map(|s| s.success())
        .unwrap_or(false);
    assert!(
        ok,
        "{cmd} is not installed; run scripts/test, which installs what the tests need"
    );
}

/// A port nothing listens on now, and never handed out before by this test process: the kernel may give
/// the same ephemeral port to two `bind(0)`s in a row once the first is closed, and a test that asked for
/// two ports (a listener and an admin address) then got one twice.
pub fn free_port() -> u16 {
    static GIVEN: std::sync::Mutex<Vec<u16>> = std::sync::Mutex::new(Vec::new());
    let mut given = GIVEN.lock().unwrap_or_else(|e| e.into_inner());
    loop {
        let port = TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        if !given.contains(&port) {
            given.push(port);
            return port;
        }
    }
}

pub struct Anteroom {
    pub child: Option<Child>,
    pub addr: SocketAddr,
    pub log: PathBuf,
    _dir: tempfile::TempDir,
}

impl Anteroom {
    /// Starts anteroom on a free port with `args` (options, then `--` and the worker command if any),
    /// and waits until it serves `ready_path` with a 2xx.
    pub fn start(args: &[&str]) -> Anteroom {
        Self::start_env(args, &[], Some("/"))
    }

    pub fn start_env(args: &[&str], env: &[(&str, &str)], ready_path: Option<&str>) -> Anteroom {
        Self::start_full(args, env, ready_path, false)
    }

    /// With `clear_env`, anteroom (and so its workers) get only PATH and `env`.
    pub fn start_full(
        args: &[&str],
        env: &[(&str, &str)],
        ready_path: Option<&str>,
        clear_env: bool,
    ) -> Anteroom {
        Self::start_from(Path::new(BIN), args, env, ready_path, clear_env)
    }

    /// As [`Anteroom::start_env`] (ready on `/`), from the binary at `bin`.
    pub fn start_bin(bin: &Path, args: &[&str], env: &[(&str, &str)]) -> Anteroom {
        Self::start_from(bin, args, env, Some("/"), false)
    }

    fn start_from(
        bin: &Path,
        args: &[&str],
        env: &[(&str, &str)],
        ready_path: Option<&str>,
        clear_env: bool,
    ) -> Anteroom {
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("anteroom.log");
        let port = free_port();
        let addr: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
        let listen = format!("127.0.0.1:{port}");
        let (opts, cmd) = match args.iter().position(|a| *a == "--") {
            Some(i) => (&args[..i], &args[i..]),
            None => (args, &[][..]),
        };
        // Many instances run at once: none takes the default admin port unless a test asks.
        let admin: &[&str] = if opts.contains(&"--admin") {
            &[]
        } else {
            &["--admin", "off"]
        };
        let mut command = Command::new(bin);
        if clear_env {
            command
                .env_clear()
                .env("PATH", std::env::var("PATH").unwrap_or_default());
        }
        let child = command
            .arg("--listen")
            .arg(&listen)
            .args(admin)
            .args(opts)
            .args(cmd)
            .envs(env.iter().copied())
            .env("ANTEROOM_LOG", "info")
            .current_dir(root())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .expect("anteroom starts");
        let a = Anteroom {
            child: Some(child),
            addr,
            log,
            _dir: dir,
        };
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Ok(r) = a.try_get(ready_path.unwrap_or("/")) {
                if ready_path.is_none() || (200..300).contains(&r.status) {
                    break;
                }
            }
            assert!(
                Instant::now() < deadline,
                "anteroom did not become ready; log:\n{}",
                a.log_text()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        a
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().unwrap().id()
    }

    pub fn get(&self, path: &str) -> Response {
        self.try_get(path)
            .unwrap_or_else(|e| panic!("GET {path}: {e}\nlog:\n{}", self.log_text()))
    }

    pub fn try_get(&self, path: &str) -> std::io::Result<Response> {
        request(
            self.addr,
            format!("GET {path} HTTP/1.1\r\nHost: test\r\nConnection: close\r\n\r\n").as_bytes(),
        )
    }

    pub fn raw(&self, bytes: &[u8]) -> Response {
        request(self.addr, bytes).unwrap()
    }

    /// Sends SIGTERM and waits for the exit; returns the exit status.
    pub fn stop(&mut self) -> std::process::ExitStatus {
        let mut child = self.child.take().unwrap();
        signal(child.id(), libc_sigterm());
        wait_timeout(&mut child, Duration::from_secs(40)).expect("anteroom stops after SIGTERM")
    }
}

impl Drop for Anteroom {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            // SIGTERM first: workers that manage children of their own are stopped as a group then,
            // where SIGKILL would only reach their leader.
            signal(c.id(), libc_sigterm());
            if wait_timeout(&mut c, Duration::from_secs(10)).is_none() {
                let _ = c.kill();
                let _ = c.wait();
            }
        }
    }
}

pub fn libc_sigterm() -> i32 {
    15
}

pub fn signal(pid: u32, sig: i32) {
    let _ = Command::new("kill")
        .arg(format!("-{sig}"))
        .arg(pid.to_string())
        .status();
}

pub fn wait_timeout(c: &mut Child, d: Duration) -> Option<std::process::ExitStatus> {
    let deadline = Instant::now() + d;
    loop {
        if let Ok(Some(s)) = c.try_wait() {
            return Some(s);
        }
        if Instant::now() > deadline {
            return None;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[derive(Debug)]
pub struct Response {
    pub status: u16,
    pub head: String,
    pub body: Vec<u8>,
}

impl Response {
    pub fn header(&self, name: &str) -> Option<String> {
        self.head.lines().skip(1).find_map(|l| {
            let (n, v) = l.split_once(':')?;
            n.trim()
                .eq_ignore_ascii_case(name)
                .then(|| v.trim().to_string())
        })
    }

    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }
}

/// Sends `bytes` on a new connection and reads one response (the server closes or sends a length).
pub fn request(addr: SocketAddr, bytes: &[u8]) -> std::io::Result<Response> {
    let mut s = TcpStream::connect(addr)?;
    s.set_read_timeout(Some(Duration::from_secs(30)))?;
    s.write_all(bytes)?;
    read_response(&mut s)
}

/// One `read` that is retried when interrupted. Linux fails a read on a socket with a timeout
/// (`SO_RCVTIMEO`) with EINTR whenever the process is stopped and resumed, even with no signal handler
/// (signal(7)); CI once failed a test on that. `read_exact` and `read_to_end` retry by themselves, a bare
/// `read` does not.
pub fn read_some<R: Read + ?Sized>(r: &mut R, buf: &mut [u8]) -> std::io::Result<usize> {
    loop {
        match r.read(buf) {
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            other => return other,
        }
    }
}

pub fn read_response(s: &mut impl Read) -> std::io::Result<Response> {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 8192];
    let head_end = loop {
        if let Some(i) = find(&buf, b"\r\n\r\n") {
            break i + 4;
        }
        let n = read_some(s, &mut chunk)?;
        if n == 0 {
            return Err(std::io::Error::new(
                std::io::ErrorKind::UnexpectedEof,
                format!(
                    "connection closed after {} bytes: {:?}",
                    buf.len(),
                    String::from_utf8_lossy(&buf)
                ),
            ));
        }
        buf.extend_from_slice(&chunk[..n]);
    };
    let head = String::from_utf8_lossy(&buf[..head_end]).into_owned();
    let status: u16 = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    let mut resp = Response {
        status,
        head,
        body: Vec::new(),
    };
    let mut rest = buf[head_end..].to_vec();
    if let Some(len) = resp.header("content-length") {
        let len: usize = len.parse().unwrap();
        while rest.len() < len {
            let n = read_some(s, &mut chunk)?;
            if n == 0 {
                break;
            }
            rest.extend_from_slice(&chunk[..n]);
        }
        rest.truncate(len);
        resp.body = rest;
    } else if resp
        .header("transfer-encoding")
        .is_some_and(|t| t.contains("chunked"))
    {
        loop {
            if let Some(body) = dechunk(&rest) {
                resp.body = body;
                break;
            }
            let n = read_some(s, &mut chunk)?;
            if n == 0 {
                break;
            }
            rest.extend_from_slice(&chunk[..n]);
        }
    } else {
        s.read_to_end(&mut rest)?;
        resp.body = rest;
    }
    Ok(resp)
}

fn find(h: &[u8], n: &[u8]) -> Option<usize> {
    h.windows(n.len()).position(|w| w == n)
}

/// The body if `data` holds a complete chunked body.
fn dechunk(mut data: &[u8]) -> Option<Vec<u8>> {
    let mut out = Vec::new();
    loop {
        let eol = find(data, b"\r\n")?;
        let size =
            usize::from_str_radix(std::str::from_utf8(&data[..eol]).ok()?.trim(), 16).ok()?;
        data = &data[eol + 2..];
        if size == 0 {
            return Some(out);
        }
        if data.len() < size + 2 {
            return None;
        }
        out.extend_from_slice(&data[..size]);
        data = &data[size + 2..];
    }
}

/// Pids of the live children of `pid` (from /proc).
pub fn children(pid: u32) -> Vec<u32> {
    let mut out = Vec::new();
    for e in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(p) = e.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        if let Ok(stat) = std::fs::read_to_string(format!("/proc/{p}/stat")) {
            // Fields after the ")" that closes the command name: state, ppid, ...
            if let Some(rest) = stat.rsplit_once(')').map(|x| x.1) {
                let f: Vec<&str> = rest.split_whitespace().collect();
                if f.get(1).and_then(|pp| pp.parse::<u32>().ok()) == Some(pid) && f[0] != "Z" {
                    out.push(p);
                }
            }
        }
    }
    out
}

pub fn alive(pid: u32) -> bool {
    Path::new(&format!("/proc/{pid}")).exists()
        && std::fs::read_to_string(format!("/proc/{pid}/stat"))
            .map(|s| {
                !s.rsplit_once(')')
                    .map(|x| x.1)
                    .unwrap_or("")
                    .trim_start()
                    .starts_with('Z')
            })
            .unwrap_or(false)
}

pub fn wait_until(what: &str, d: Duration, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + d;
    while !f() {
        assert!(Instant::now() < deadline, "timed out waiting for: {what}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// A real nginx with one `server` block, on a free port, in a temporary prefix.
pub struct Nginx {
    child: Option<Child>,
    pub port: u16,
    pub dir: tempfile::TempDir,
}

impl Nginx {
    /// `locations` is the inside of the server block (after `listen`).
    pub fn start(locations: &str) -> Nginx {
        Self::start_with("", locations)
    }

    /// With `http_extra` (upstream blocks and the like) in the http block.
    pub fn start_with(http_extra: &str, locations: &str) -> Nginx {
        let bin = ["/usr/sbin/nginx", "/usr/bin/nginx"]
            .into_iter()
            .find(|p| Path::new(p).exists())
            .expect("nginx is not installed; run scripts/test, which installs what the tests need");
        let dir = tempfile::tempdir().unwrap();
        let port = free_port();
        let d = dir.path().display();
        let conf = format!(
            "daemon off;\nmaster_process off;\nworker_processes 1;\nerror_log {d}/error.log info;\npid {d}/nginx.pid;\n\
             events {{ worker_connections 4096; }}\n\
             http {{\n access_log {d}/access.log;\n client_body_temp_path {d}/body;\n proxy_temp_path {d}/proxy;\n\
             fastcgi_temp_path {d}/fastcgi;\n uwsgi_temp_path {d}/uwsgi;\n scgi_temp_path {d}/scgi;\n\
             {http_extra}\n server {{\n  listen 127.0.0.1:{port};\n{locations}\n }}\n}}\n"
        );
        std::fs::write(dir.path().join("nginx.conf"), conf).unwrap();
        let child = Command::new(bin)
            .args(["-p", &d.to_string(), "-c", &format!("{d}/nginx.conf")])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let n = Nginx {
            child: Some(child),
            port,
            dir,
        };
        wait_until("nginx to listen", Duration::from_secs(10), || {
            TcpStream::connect(("127.0.0.1", port)).is_ok()
        });
        n
    }

    pub fn addr(&self) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], self.port))
    }

    pub fn error_log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("error.log")).unwrap_or_default()
    }
}

impl Drop for Nginx {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// A GET through `addr` that must succeed, with `Connection: close`.
pub fn get(addr: SocketAddr, path: &str) -> Response {
    request(
        addr,
        format!("GET {path} HTTP/1.1\r\nHost: test\r\nConnection: close\r\n\r\n").as_bytes(),
    )
    .unwrap_or_else(|e| panic!("GET {path}: {e}"))
}

/// The fault tests' long form (`ANTEROOM_FAULTS=long`, which `bench/run --scenarios faults` sets): the
/// sizes and durations of the issue that asked for them, too slow for every run of `scripts/test`.
pub fn long_form() -> bool {
    std::env::var("ANTEROOM_FAULTS").is_ok_and(|v| v == "long")
}

/// One `FAULT-RESULT {json}` line on stdout, which `bench/run` collects into its "Faults and abuse" table.
pub fn fault_result(case: &str, what: &str, measured: &str, target: &str, ok: bool) {
    let line = serde_json::json!({
        "case": case, "what": what, "measured": measured, "target": target, "ok": ok,
    });
    println!("FAULT-RESULT {line}");
}

/// The value of a sample in a Prometheus text from `/metrics`: `series` is a name with its labels exactly
/// as encoded (`anteroom_workers{state="idle"}`), or a bare name, which matches its first sample with or
/// without labels. The one parser for the tests that read `/metrics`.
pub fn metric(text: &str, series: &str) -> Option<f64> {
    text.lines().find_map(|l| {
        let rest = l.strip_prefix(series)?;
        let rest = if !series.contains('{') && rest.starts_with('{') {
            rest.split_once('}')?.1
        } else {
            rest
        };
        rest.strip_prefix(' ')?
            .split_whitespace()
            .next()?
            .parse()
            .ok()
    })
}

/// One FastCGI request (KEEP_CONN, id `id`) as nginx sends it, appended to `out`: `method` and `path`
/// (PATH_INFO, QUERY_STRING, REQUEST_URI), `params` besides, and `body` on STDIN with its CONTENT_LENGTH.
pub fn fcgi_request(
    id: u16,
    method: &str,
    path: &str,
    params: &[(&str, &str)],
    body: &[u8],
    out: &mut bytes::BytesMut,
) {
    use anteroom::fastcgi as fcgi;
    fcgi::BeginRequest {
        role: fcgi::RESPONDER,
        flags: fcgi::KEEP_CONN,
    }
    .encode(id, out);
    let len = body.len().to_string();
    let length = [("CONTENT_LENGTH", len.as_str())];
    let mut pairs = Vec::new();
    let fixed = [
        ("REQUEST_METHOD", method),
        ("PATH_INFO", path.split('?').next().unwrap_or(path)),
        ("QUERY_STRING", path.split_once('?').map_or("", |x| x.1)),
        ("REQUEST_URI", path),
        ("SERVER_PROTOCOL", "HTTP/1.1"),
    ];
    let length = if body.is_empty() {
        &[][..]
    } else {
        &length[..]
    };
    for (k, v) in fixed.iter().chain(length).chain(params) {
        fcgi::encode_pair(k.as_bytes(), v.as_bytes(), &mut pairs).unwrap();
    }
    fcgi::encode_stream(fcgi::PARAMS, id, &pairs, out);
    fcgi::encode_stream_end(fcgi::PARAMS, id, out);
    if !body.is_empty() {
        fcgi::encode_stream(fcgi::STDIN, id, body, out);
    }
    fcgi::encode_stream_end(fcgi::STDIN, id, out);
}

/// The STDOUT and STDERR of request `id`, read from `s` until its END_REQUEST.
pub fn fcgi_answer(s: &mut impl Read, id: u16) -> (Vec<u8>, String) {
    use anteroom::fastcgi as fcgi;
    let (mut stdout, mut stderr) = (Vec::new(), Vec::new());
    let mut buf = bytes::BytesMut::new();
    let mut chunk = [0u8; 65536];
    loop {
        while let Some(r) = fcgi::decode_record(&mut buf).unwrap() {
            assert_eq!(r.request_id, id);
            match r.kind {
                fcgi::STDOUT => stdout.extend_from_slice(&r.content),
                fcgi::STDERR => stderr.extend_from_slice(&r.content),
                fcgi::END_REQUEST => return (stdout, String::from_utf8_lossy(&stderr).into()),
                _ => {}
            }
        }
        let n = read_some(s, &mut chunk).unwrap_or_else(|e| panic!("no END_REQUEST: {e}"));
        assert!(n > 0, "the connection ended before END_REQUEST");
        buf.extend_from_slice(&chunk[..n]);
    }
}

/// The head (as text, through its blank line) and the body bytes of a whole raw response.
pub fn split_head(all: &[u8]) -> (String, &[u8]) {
    let end = all
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .unwrap_or_else(|| panic!("no head in {:?}", String::from_utf8_lossy(all)))
        + 4;
    (
        String::from_utf8_lossy(&all[..end]).into_owned(),
        &all[end..],
    )
}
