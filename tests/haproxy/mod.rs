//! A real HAProxy run from `deploy/haproxy.cfg` (the variables set, optionally without the agent), and its
//! servers' state read back from its stats socket: what the agent tests and the multi-host tests share.
#![allow(dead_code)]

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

/// One server as HAProxy sees it (`show servers state`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServerState {
    pub name: String,
    /// 0 stopped (DOWN), 1 starting, 2 running (UP), 3 stopping.
    pub op_state: u32,
    /// Administrative flags: 0x01|0x02|0x04 maintenance, 0x08|0x10 drain (0x08: forced, as the agent sets it).
    pub admin_state: u32,
    /// The weight in use (the agent's percentage of `weight 100`).
    pub weight: u32,
}

impl ServerState {
    pub fn up(&self) -> bool {
        self.op_state == 2
    }

    pub fn draining(&self) -> bool {
        self.admin_state & 0x18 != 0
    }
}

pub struct Haproxy {
    child: Option<Child>,
    pub dir: tempfile::TempDir,
    pub stats: PathBuf,
    pub log: PathBuf,
}

impl Haproxy {
    /// HAProxy with `deploy/haproxy.cfg`, its frontend on `front`, `hosts` as host1.., and with or without
    /// the agent-check line.
    pub fn start(front: &str, hosts: &[&str], agent: bool) -> Haproxy {
        Haproxy::start_in(None, front, hosts, agent)
    }

    /// The same, in the network namespace `netns` (through `ip netns exec`) if one is given.
    pub fn start_in(netns: Option<&str>, front: &str, hosts: &[&str], agent: bool) -> Haproxy {
        super::common::require("haproxy");
        let dir = tempfile::tempdir().unwrap();
        let cfg =
            std::fs::read_to_string(super::common::root().join("deploy/haproxy.cfg")).unwrap();
        let mut cfg: String = cfg
            .lines()
            .filter(|l| agent || !l.contains("agent-check"))
            // Servers beyond the hosts given are left out.
            .filter(|l| {
                !l.trim_start().starts_with("server host")
                    || (1..=hosts.len()).any(|i| l.contains(&format!("server host{i} ")))
            })
            .map(|l| format!("{l}\n"))
            .collect();
        for i in hosts.len()..3 {
            assert!(!cfg.contains(&format!("HOST{}", i + 1)), "{cfg}");
        }
        if agent {
            assert!(
                cfg.contains("agent-check"),
                "deploy/haproxy.cfg lost its agent-check"
            );
        }
        cfg.push('\n');
        let path = dir.path().join("haproxy.cfg");
        std::fs::write(&path, cfg).unwrap();
        let stats = dir.path().join("stats.sock");
        let log = dir.path().join("haproxy.log");
        let mut cmd = match netns {
            Some(ns) => {
                let mut c = Command::new("ip");
                c.args(["netns", "exec", ns, "haproxy"]);
                c
            }
            None => Command::new("haproxy"),
        };
        cmd.arg("-db")
            .arg("-f")
            .arg(&path)
            .env("STATS_SOCKET", &stats)
            .env("FRONT", front)
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap());
        for (i, h) in hosts.iter().enumerate() {
            cmd.env(format!("HOST{}", i + 1), h);
        }
        let child = cmd.spawn().expect("haproxy starts");
        let h = Haproxy {
            child: Some(child),
            dir,
            stats,
            log,
        };
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while h.try_servers().is_err() {
            assert!(
                std::time::Instant::now() < deadline,
                "haproxy did not start; its log:\n{}",
                h.log_text()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        h
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Sends one command on the stats socket and returns the answer.
    pub fn command(&self, line: &str) -> std::io::Result<String> {
        command(&self.stats, line)
    }

    fn try_servers(&self) -> std::io::Result<Vec<ServerState>> {
        let text = self.command("show servers state app")?;
        Ok(parse_state(&text))
    }

    /// Every server's state now.
    pub fn servers(&self) -> Vec<ServerState> {
        self.try_servers()
            .unwrap_or_else(|e| panic!("stats socket: {e}\nhaproxy log:\n{}", self.log_text()))
    }

    pub fn server(&self, name: &str) -> ServerState {
        self.servers()
            .into_iter()
            .find(|s| s.name == name)
            .unwrap_or_else(|| panic!("no server {name}"))
    }
}

impl Drop for Haproxy {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

pub fn command(stats: &Path, line: &str) -> std::io::Result<String> {
    let mut s = UnixStream::connect(stats)?;
    s.set_read_timeout(Some(Duration::from_secs(5)))?;
    s.write_all(format!("{line}\n").as_bytes())?;
    let mut out = String::new();
    s.read_to_string(&mut out)?;
    Ok(out)
}

/// `show servers state`: a version line, a header line, then one line per server.
pub fn parse_state(text: &str) -> Vec<ServerState> {
    text.lines()
        .filter(|l| !l.starts_with('#') && l.split_whitespace().count() > 8)
        .filter_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            Some(ServerState {
                name: f[3].to_string(),
                op_state: f[5].parse().ok()?,
                admin_state: f[6].parse().ok()?,
                weight: f[7].parse().ok()?,
            })
        })
        .collect()
}
