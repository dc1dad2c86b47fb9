//! The admin listener with the real binary: health, metrics during a burst, the status document after a
//! worker is killed, and the status page rendered by a headless Chromium under load.

mod common;

use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use common::*;
use serde_json::Value;

/// anteroom with its admin listener on a free port of its own.
struct WithAdmin {
    a: Anteroom,
    admin: SocketAddr,
}

impl WithAdmin {
    /// `opts` are options only; `cmd` the worker command (empty for the demo app). With `wait_public`,
    /// returns once the public listener answers a 2xx, else as soon as the admin listener answers.
    fn start(opts: &[&str], cmd: &[&str], wait_public: bool) -> WithAdmin {
        let port = free_port();
        let admin: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
        let admin_arg = admin.to_string();
        let mut args: Vec<&str> = vec!["--admin", &admin_arg];
        args.extend_from_slice(opts);
        if !cmd.is_empty() {
            args.push("--");
            args.extend_from_slice(cmd);
        }
        let ready = if wait_public { Some("/") } else { None };
        let a = Anteroom::start_env(&args, &[], ready);
        let w = WithAdmin { a, admin };
        wait_until("the admin listener", Duration::from_secs(15), || {
            w.try_admin("/health/live").is_ok()
        });
        w
    }

    fn try_admin(&self, path: &str) -> std::io::Result<Response> {
        request(
            self.admin,
            format!("GET {path} HTTP/1.1\r\nHost: admin\r\nConnection: close\r\n\r\n").as_bytes(),
        )
    }

    fn admin(&self, path: &str) -> Response {
        self.try_admin(path)
            .unwrap_or_else(|e| panic!("admin GET {path}: {e}\nlog:\n{}", self.a.log_text()))
    }

    fn status(&self) -> Value {
        let r = self.admin("/status");
        assert_eq!(r.status, 200, "{}", r.text());
        assert_eq!(
            r.header("content-type").as_deref(),
            Some("application/json")
        );
        serde_json::from_slice(&r.body)
            .unwrap_or_else(|e| panic!("/status is not JSON ({e}): {}", r.text()))
    }
}

#[test]
fn health_live_and_ready_then_not_ready_in_a_crash_loop() {
    let w = WithAdmin::start(&["--workers", "2"], &[], true);
    let live = w.admin("/health/live");
    assert_eq!((live.status, live.text().trim()), (200, "ok"));
    wait_until("/health/ready to be 200", Duration::from_secs(10), || {
        w.admin("/health/ready").status == 200
    });

    // The rest of the surface: 404 for unknown paths, 405 for other methods, HEAD allowed.
    assert_eq!(w.admin("/nope").status, 404);
    let post = request(
        w.admin,
        b"POST /status HTTP/1.1\r\nHost: a\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
    )
    .unwrap();
    assert_eq!(post.status, 405);
    assert_eq!(post.header("allow").as_deref(), Some("GET, HEAD"));
    let head = request(
        w.admin,
        b"HEAD /health/live HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n",
    )
    .unwrap();
    assert_eq!(head.status, 200);
    let page = w.admin("/");
    assert_eq!(page.status, 200);
    assert!(page
        .header("content-type")
        .is_some_and(|c| c.starts_with("text/html")));
    assert!(
        !page.text().contains("http://") && !page.text().contains("https://"),
        "the status page must not load anything from elsewhere"
    );
    // The admin endpoints are never on the public listener: there they are the app's pages.
    assert_ne!(w.a.get("/health/ready").text(), "ready\n");

    // Every worker exits at once: a crash loop, never ready.
    let w = WithAdmin::start(&["--workers", "2"], &["false"], false);
    let mut last = None;
    let deadline = Instant::now() + Duration::from_secs(15);
    while Instant::now() < deadline {
        let r = w.admin("/health/ready");
        if r.status == 503 {
            last = Some(r);
            break;
        }
        thread::sleep(Duration::from_millis(100));
    }
    let r = last.unwrap_or_else(|| panic!("never 503; log:\n{}", w.a.log_text()));
    assert!(r.text().starts_with("not ready: "), "{}", r.text());
    // Still 503 a moment later, and now because every slot is failing.
    wait_until(
        "/health/ready to blame the crash loop",
        Duration::from_secs(10),
        || {
            let r = w.admin("/health/ready");
            r.status == 503 && r.text().contains("crash loop")
        },
    );
    assert_eq!(w.admin("/health/live").status, 200);
    let st = w.status();
    assert_eq!(st["ready"], false);
    assert!(st["not_ready"].is_string());
}

#[test]
fn metrics_show_the_queue_rise_and_drain_during_a_burst() {
    const N: usize = 100;
    let w = WithAdmin::start(&["--workers", "2"], &[], true);
    let m = w.admin("/metrics");
    assert_eq!(m.status, 200);
    assert_eq!(
        m.header("content-type").as_deref(),
        Some("application/openmetrics-text; version=1.0.0; charset=utf-8")
    );
    let text = m.text();
    assert!(text.ends_with("# EOF\n"), "{text}");
    for want in [
        "# TYPE anteroom_queue_depth gauge",
        "# TYPE anteroom_workers gauge",
        "anteroom_workers{state=\"idle\"}",
        "anteroom_workers{state=\"busy\"} 0",
        "anteroom_workers{state=\"backoff\"} 0",
        "# TYPE anteroom_kernel_listen_overflows counter",
        "anteroom_kernel_listen_overflows_total ",
        "anteroom_kernel_listen_drops_total ",
        "anteroom_queue_limit 4096",
    ] {
        assert!(text.contains(want), "no {want:?} in:\n{text}");
    }
    let listener = format!("{{listener=\"{}\"}}", w.a.addr);
    assert_eq!(
        metric(&text, &format!("anteroom_listen_queue{listener}")),
        Some(0.0),
        "{text}"
    );
    assert!(
        metric(&text, &format!("anteroom_listen_backlog{listener}")).is_some_and(|b| b > 0.0),
        "{text}"
    );

    let addr = w.a.addr;
    let clients: Vec<_> = (0..N)
        .map(|_| {
            thread::spawn(move || {
                request(
                    addr,
                    b"GET /sleep?ms=200 HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n",
                )
                .map(|r| r.status)
            })
        })
        .collect();
    let mut depths = Vec::new();
    while !clients.iter().all(|c| c.is_finished()) {
        let t = w.admin("/metrics").text();
        depths.push(metric(&t, "anteroom_queue_depth").expect("a queue depth sample"));
        thread::sleep(Duration::from_millis(50));
    }
    for c in clients {
        assert_eq!(c.join().unwrap().unwrap(), 200);
    }
    let peak = depths.iter().cloned().fold(0.0, f64::max);
    assert!(peak >= 10.0, "the queue never held 10 requests: {depths:?}");
    // A request is counted once its answer has gone: the client may have read it a moment before.
    let served = || {
        let m = w.admin("/metrics").text();
        metric(
            &m,
            "anteroom_requests_total{outcome=\"served\",status=\"200\"}",
        )
        .unwrap_or(0.0)
    };
    wait_until("every request counted", Duration::from_secs(5), || {
        served() >= N as f64
    });
    let after = w.admin("/metrics").text();
    assert_eq!(metric(&after, "anteroom_queue_depth"), Some(0.0), "{after}");
    assert_eq!(
        metric(&after, "anteroom_workers{state=\"idle\"}"),
        Some(2.0)
    );
}

#[allow(
    clippy::too_many_lines,
    clippy::cognitive_complexity,
    reason = "one end-to-end scenario against real workers, read top to bottom"
)]
#[test]
fn status_shows_the_pool_and_explains_a_killed_worker() {
    let w = WithAdmin::start(&["--workers", "2"], &[], true);
    let st = w.status();
    assert_eq!(st["version"], env!("CARGO_PKG_VERSION"));
    assert!(st["uptime_s"].as_f64().is_some());
    assert_eq!(st["queue"]["depth"], 0);
    assert_eq!(st["queue"]["limit"], 4096);
    assert!(st["requests"]["served"].as_u64().unwrap() >= 1, "{st}");
    assert_eq!(st["requests"]["refused"], 0);
    assert_eq!(st["requests"]["failed"], 0);
    let workers = st["workers"].as_array().unwrap();
    assert_eq!(workers.len(), 2, "{st}");
    for w in workers {
        for k in [
            "slot",
            "generation",
            "pid",
            "state",
            "state_ms",
            "request",
            "served",
            "rss_bytes",
        ] {
            assert!(w.get(k).is_some(), "no {k} in {w}");
        }
    }
    assert_eq!(st["deaths"], Value::Array(vec![]));
    let listeners = st["listeners"].as_array().unwrap();
    assert_eq!(listeners.len(), 1);
    assert_eq!(listeners[0]["listen"], w.a.addr.to_string());
    assert_eq!(listeners[0]["queued"], 0);
    assert!(listeners[0]["backlog"].as_u64().unwrap() > 0, "{st}");
    assert!(st["kernel"]["somaxconn"].as_u64().is_some(), "{st}");
    assert!(st["kernel"].get("listen_overflows").is_some());
    assert!(st["kernel"].get("listen_drops").is_some());
    wait_until("ready", Duration::from_secs(10), || {
        w.status()["ready"] == true
    });

    // A slow request; SIGKILL the worker holding it, found on the scoreboard.
    let addr = w.a.addr;
    let client = thread::spawn(move || {
        request(
            addr,
            b"GET /sleep?ms=3000 HTTP/1.1\r\nHost: t\r\nX-Request-Id: held-by-the-victim\r\nConnection: close\r\n\r\n",
        )
        .unwrap()
    });
    let mut victim = 0;
    wait_until(
        "a worker to hold the request",
        Duration::from_secs(10),
        || {
            let st = w.status();
            let busy = st["workers"]
                .as_array()
                .unwrap()
                .iter()
                .find(|r| r["state"] == "busy" && r["request_id"] == "held-by-the-victim");
            if let Some(r) = busy {
                assert_eq!(
                    r["request"], "GET /sleep",
                    "paths only by default (--status-show-query)"
                );
                victim = r["pid"].as_u64().unwrap() as u32;
            }
            victim != 0
        },
    );
    signal(victim, 9);
    let mut st = Value::Null;
    wait_until("the death on /status", Duration::from_secs(10), || {
        st = w.status();
        !st["deaths"].as_array().unwrap().is_empty()
    });
    let d = &st["deaths"][0];
    assert_eq!(d["pid"], victim, "{st}");
    assert_eq!(d["cause"], "crashed", "{st}");
    assert!(
        d["status"].as_str().unwrap().contains("SIGKILL"),
        "{}",
        d["status"]
    );
    assert_eq!(d["request"]["id"], "held-by-the-victim", "{st}");
    assert_eq!(d["request"]["method"], "GET");
    assert_eq!(d["request"]["target"], "/sleep");
    assert!(d["at"].as_f64().unwrap() > 1.6e9);
    assert!(d["lived_ms"].as_u64().is_some());
    assert!(d["last_output"].is_array());
    // The GET was retried on the other worker.
    assert_eq!(client.join().unwrap().status, 200);
    // The death is on /metrics too.
    let m = w.admin("/metrics").text();
    assert_eq!(
        metric(&m, "anteroom_worker_deaths_total{cause=\"crashed\"}"),
        Some(1.0),
        "{m}"
    );
}

/// Runs chromium headless on `url` with `extra` (the output option) and returns its stdout.
fn chromium(url: &str, extra: &str) -> Vec<u8> {
    let profile = tempfile::tempdir().unwrap();
    let child = Command::new("chromium")
        .args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-quic",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--disable-dev-shm-usage",
        ])
        .arg(format!("--user-data-dir={}", profile.path().display()))
        .args(["--window-size=1280,900", "--virtual-time-budget=5000"])
        .arg(extra)
        .arg(url)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("chromium starts");
    let out = wait_output(child, Duration::from_secs(90));
    assert!(out.status.success(), "chromium failed: {:?}", out.status);
    out.stdout
}

fn wait_output(child: Child, limit: Duration) -> std::process::Output {
    let pid = child.id();
    let done = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let watchdog = {
        let done = done.clone();
        thread::spawn(move || {
            let deadline = Instant::now() + limit;
            while Instant::now() < deadline {
                if done.load(std::sync::atomic::Ordering::Relaxed) {
                    return;
                }
                thread::sleep(Duration::from_millis(100));
            }
            signal(pid, 9);
        })
    };
    let out = child.wait_with_output().unwrap();
    done.store(true, std::sync::atomic::Ordering::Relaxed);
    watchdog.join().unwrap();
    out
}

#[test]
fn the_status_page_renders_live_data_in_a_headless_browser() {
    require("chromium");
    require("oha");
    let w = WithAdmin::start(&["--workers", "2"], &[], true);
    let url = format!("http://{}/sleep?ms=50", w.a.addr);
    let mut load = Command::new("oha")
        .args(["-z", "30s", "-c", "20", "--no-tui"])
        .arg(&url)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("oha starts");
    struct KillOnDrop<'a>(&'a mut Child);
    impl Drop for KillOnDrop<'_> {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
    let _load = KillOnDrop(&mut load);
    wait_until(
        "the load to reach the workers",
        Duration::from_secs(10),
        || w.status()["queue"]["depth"].as_u64().unwrap_or(0) > 0,
    );
    let page = format!("http://{}/", w.admin);

    let dir = tempfile::tempdir().unwrap();
    let png = dir.path().join("status.png");
    chromium(&page, &format!("--screenshot={}", png.display()));
    let size = std::fs::metadata(&png)
        .map(|m| m.len())
        .unwrap_or_else(|e| panic!("no screenshot at {}: {e}", png.display()));
    assert!(size > 20_000, "the screenshot is only {size} bytes");
    let bytes = std::fs::read(&png).unwrap();
    assert!(bytes.starts_with(b"\x89PNG"), "not a PNG");

    let dom = String::from_utf8_lossy(&chromium(&page, "--dump-dom")).into_owned();
    // What the script rendered, not its own source: the scoreboard's body.
    let tbody = dom
        .split("<tbody id=\"workers\">")
        .nth(1)
        .and_then(|rest| rest.split("</tbody>").next())
        .unwrap_or_else(|| panic!("no workers table in the DOM:\n{dom}"));
    assert!(
        tbody.contains(">busy<"),
        "no busy worker on the scoreboard: {tbody}"
    );
    let pids: Vec<u64> = w.status()["workers"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|r| r["pid"].as_u64())
        .collect();
    assert!(
        pids.iter().any(|p| tbody.contains(&format!(">{p}<"))),
        "no worker pid {pids:?} on the scoreboard: {tbody}"
    );
    assert!(
        dom.contains(">READY<"),
        "the page does not say READY:\n{dom}"
    );
    let conns = dom.split("id=\"t-conns\">").nth(1).unwrap_or_default();
    assert!(
        conns.starts_with(|c: char| c.is_ascii_digit()),
        "no connection count on the page: {}",
        &conns[..conns.len().min(80)]
    );
    assert!(
        dom.contains(&w.a.addr.to_string()),
        "the public listener is not listed"
    );
}
