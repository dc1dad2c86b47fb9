//! HAProxy's agent-check (`--agent`) and the graceful leave (`--drain-delay`): the lines the agent writes as the
//! host's state changes (load, SIGTERM, a crash loop), and the weights and states a real HAProxy, configured
//! with `deploy/haproxy.cfg`, applies from them, read back from its stats socket.

mod common;
mod haproxy;

use std::io::Read;
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use common::{get, libc_sigterm, signal, wait_until, Anteroom, BIN};
use haproxy::Haproxy;

/// One agent check: connect, read the line, as HAProxy does.
fn agent_line(addr: &str) -> String {
    let mut s = TcpStream::connect(addr).unwrap_or_else(|e| panic!("agent {addr}: {e}"));
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let mut line = String::new();
    s.read_to_string(&mut line).unwrap();
    line
}

/// The weight of an `up ready N%` line.
fn weight(line: &str) -> Option<u32> {
    line.strip_prefix("up ready ")?
        .trim_end()
        .strip_suffix('%')?
        .parse()
        .ok()
}

fn local() -> String {
    format!("127.0.0.1:{}", common::free_port())
}

/// A block of loopback addresses of its own for each test of each run (127.X.Y.1-3), so that hosts can all
/// use the ports of deploy/haproxy.cfg (8000, 8001, 8002).
fn loopback_block(test: u8) -> [String; 3] {
    let pid = std::process::id();
    let (x, y) = (100 + (pid % 100) as u8, ((pid / 100) % 200) as u8 + test);
    [1, 2, 3].map(|h| format!("127.{x}.{y}.{h}"))
}

#[test]
fn the_agent_follows_load_and_a_sigterm_drains_before_the_listener_closes() {
    let (admin, agent) = (local(), local());
    let mut a = Anteroom::start(&[
        "--workers",
        "2",
        "--admin",
        &admin,
        "--agent",
        &agent,
        "--drain-delay",
        "3",
    ]);
    wait_until("up ready 100% when idle", Duration::from_secs(10), || {
        agent_line(&agent) == "up ready 100%\n"
    });

    // Two requests at the workers and two queued: two per worker, times the measured time per request (the
    // quick requests so far: about 100 ms, the in-flight ones are not measured yet), about 33%.
    let addr = a.addr;
    let load: Vec<_> = (0..4)
        .map(|_| std::thread::spawn(move || get(addr, "/sleep?ms=2500").status))
        .collect();
    let mut seen = Vec::new();
    wait_until("a lower weight under load", Duration::from_secs(2), || {
        let line = agent_line(&agent);
        seen.push(line.clone());
        weight(&line).is_some_and(|w| w <= 50)
    });
    for l in load {
        assert_eq!(l.join().unwrap(), 200);
    }
    wait_until("100% again once idle", Duration::from_secs(5), || {
        agent_line(&agent) == "up ready 100%\n"
    });

    let admin_addr: SocketAddr = admin.parse().unwrap();
    assert_eq!(get(admin_addr, "/health/ready").status, 200);
    let sigterm = Instant::now();
    signal(a.pid(), libc_sigterm());
    wait_until("drain after SIGTERM", Duration::from_secs(1), || {
        agent_line(&agent) == "drain\n"
    });
    let ready = get(admin_addr, "/health/ready");
    assert_eq!(ready.status, 503, "{}", ready.text());
    assert!(ready.text().contains("stopping"), "{}", ready.text());
    // Still serving and accepting new connections during the delay.
    while sigterm.elapsed() < Duration::from_millis(2300) {
        let r = a.try_get("/").unwrap_or_else(|e| {
            panic!(
                "refused {:?} after SIGTERM, within --drain-delay 3: {e}\n{}",
                sigterm.elapsed(),
                a.log_text()
            )
        });
        assert_eq!(r.status, 200);
        std::thread::sleep(Duration::from_millis(200));
    }
    wait_until(
        "the listener closed after the delay",
        Duration::from_secs(8),
        || TcpStream::connect(addr).is_err(),
    );
    assert!(
        sigterm.elapsed() >= Duration::from_secs(3),
        "closed after {:?}",
        sigterm.elapsed()
    );
    let status = common::wait_timeout(a.child.as_mut().unwrap(), Duration::from_secs(10));
    assert!(status.is_some_and(|s| s.success()), "{status:?}");
    a.child = None;
    assert!(seen.iter().all(|l| l.starts_with("up ready ")), "{seen:?}");
}

#[test]
fn a_crash_loop_is_down_and_up_again_once_the_app_starts() {
    let dir = tempfile::tempdir().unwrap();
    let broken = dir.path().join("broken");
    std::fs::write(&broken, "").unwrap();
    let agent = local();
    let script = format!(
        "test -e {} && exit 1; exec {BIN} demo-worker",
        broken.display()
    );
    let _a = Anteroom::start_env(
        &[
            "--workers",
            "2",
            "--agent",
            &agent,
            "--",
            "sh",
            "-c",
            &script,
        ],
        &[],
        None,
    );
    wait_until(
        "down while every slot fails",
        Duration::from_secs(10),
        || agent_line(&agent).starts_with("down#"),
    );
    std::fs::remove_file(&broken).unwrap();
    wait_until("up once a worker starts", Duration::from_secs(20), || {
        agent_line(&agent).starts_with("up ready ")
    });
}

/// Three hosts behind HAProxy (deploy/haproxy.cfg): a loaded host's weight falls and comes back, a stopping
/// host is drained while requests through HAProxy all succeed.
#[test]
fn haproxy_applies_the_agents_weights_and_drain() {
    let hosts = loopback_block(0);
    let host_refs: Vec<&str> = hosts.iter().map(String::as_str).collect();
    let mut running: Vec<Anteroom> = hosts
        .iter()
        .map(|h| {
            let (listen, admin, agent) = (
                format!("{h}:8000"),
                format!("{h}:8001"),
                format!("{h}:8002"),
            );
            Anteroom::start(&[
                "--workers",
                "2",
                "--listen",
                &listen,
                "--admin",
                &admin,
                "--agent",
                &agent,
                "--drain-delay",
                "3",
            ])
        })
        .collect();
    let front = local();
    let lb = Haproxy::start(&front, &host_refs, true);
    wait_until("every host UP at 100%", Duration::from_secs(15), || {
        let s = lb.servers();
        s.len() == 3 && s.iter().all(|s| s.up() && s.weight == 100 && !s.draining())
    });

    // host1's workers busy with four requests sent to it directly: its weight falls, the others' stays.
    let addr1: SocketAddr = format!("{}:8000", hosts[0]).parse().unwrap();
    let load: Vec<_> = (0..4)
        .map(|_| std::thread::spawn(move || get(addr1, "/sleep?ms=3000").status))
        .collect();
    wait_until(
        "host1's weight at most 50 in HAProxy",
        Duration::from_secs(3),
        || lb.server("host1").weight <= 50,
    );
    let s = lb.servers();
    assert!(s[1].weight == 100 && s[2].weight == 100, "{s:?}");
    for l in load {
        assert_eq!(l.join().unwrap(), 200);
    }
    wait_until("host1 back at 100", Duration::from_secs(5), || {
        lb.server("host1").weight == 100
    });

    // host2 leaves: HAProxy drains it at the next agent check, and no request through HAProxy fails.
    let front_addr: SocketAddr = front.parse().unwrap();
    signal(running[1].pid(), libc_sigterm());
    let sigterm = Instant::now();
    wait_until("host2 DRAIN in HAProxy", Duration::from_secs(3), || {
        lb.server("host2").draining()
    });
    let drained_after = sigterm.elapsed();
    assert!(drained_after < Duration::from_secs(3), "{drained_after:?}");
    let mut statuses = Vec::new();
    while sigterm.elapsed() < Duration::from_secs(6) {
        statuses.push(get(front_addr, "/").status);
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(statuses.iter().all(|s| *s == 200), "{statuses:?}");
    let status = common::wait_timeout(running[1].child.as_mut().unwrap(), Duration::from_secs(10));
    assert!(status.is_some_and(|s| s.success()), "{status:?}");
    running[1].child = None;
    wait_until("host2 DOWN once gone", Duration::from_secs(5), || {
        !lb.server("host2").up()
    });
    eprintln!(
        "host2 drained {drained_after:?} after SIGTERM; {} requests through HAProxy meanwhile, all 200",
        statuses.len()
    );
}

/// SIGUSR2: the agent says drain while the new process starts, then the new process answers on the same
/// socket, and the old one, finishing its requests, no longer does (the two by turns would make HAProxy's
/// weight flap); the agent's socket never refuses a check.
#[test]
fn an_upgrade_drains_then_hands_the_agent_to_the_new_process() {
    let agent = local();
    let mut a = Anteroom::start(&["--workers", "1", "--agent", &agent]);
    wait_until(
        "up ready before the upgrade",
        Duration::from_secs(10),
        || agent_line(&agent).starts_with("up ready "),
    );
    let old = a.pid();
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let poller = {
        let (agent, stop) = (agent.clone(), stop.clone());
        std::thread::spawn(move || {
            let mut lines = Vec::new();
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let alive = common::alive(old);
                lines.push((alive, agent_line(&agent)));
                std::thread::sleep(Duration::from_millis(20));
            }
            lines
        })
    };
    // A request the old process finishes after the handover: it lives on for a while, its agent silent.
    let addr = a.addr;
    let slow = std::thread::spawn(move || get(addr, "/sleep?ms=2000").status);
    std::thread::sleep(Duration::from_millis(200));
    signal(old, 12);
    let status = common::wait_timeout(a.child.as_mut().unwrap(), Duration::from_secs(30));
    a.child = None;
    let log = a.log_text();
    let new: u32 = log
        .rsplit("new_pid=")
        .next()
        .and_then(|s| s.split(|c: char| !c.is_ascii_digit()).next())
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("no new_pid in the log:\n{log}"));
    std::thread::sleep(Duration::from_millis(1500));
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let lines = poller.join().unwrap();
    signal(new, libc_sigterm());
    wait_until("the new process to stop", Duration::from_secs(20), || {
        !common::alive(new)
    });
    assert!(status.is_some_and(|s| s.success()), "{status:?}\n{log}");
    assert!(
        lines.iter().any(|(_, l)| l == "drain\n"),
        "no drain during the upgrade: {lines:?}"
    );
    assert_eq!(slow.join().unwrap(), 200);
    // Once the new process answers (the first up after the drain), nothing says drain again: the old
    // process, still finishing its request, no longer answers.
    let first_drain = lines.iter().position(|(_, l)| l == "drain\n").unwrap();
    let handed = first_drain
        + lines[first_drain..]
            .iter()
            .position(|(_, l)| l.starts_with("up ready "))
            .unwrap_or_else(|| panic!("never up again: {lines:?}"));
    assert!(
        lines[handed..]
            .iter()
            .all(|(_, l)| l.starts_with("up ready ")),
        "{lines:?}"
    );
    assert!(
        lines[handed..].iter().any(|(old_alive, _)| *old_alive),
        "the old process was gone before the new one answered: the test proves nothing\n{lines:?}"
    );
    let after: Vec<_> = lines.iter().filter(|(old_alive, _)| !old_alive).collect();
    assert!(!after.is_empty(), "{lines:?}");
    let last = &lines.last().unwrap().1;
    assert!(last.starts_with("up ready "), "{lines:?}");
}
