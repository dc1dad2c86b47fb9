//! systemd, both ways: listening sockets it passes (socket activation) and what anteroom tells it
//! (`sd_notify`: ready, status, reloading, stopping, watchdog).
//!
//! Everything systemd says comes in environment variables (`LISTEN_FDS`, `LISTEN_PID`, `LISTEN_FDNAMES`,
//! `NOTIFY_SOCKET`, `WATCHDOG_USEC`, `WATCHDOG_PID`). They are read once, first thing in `main` while the
//! process has a single thread (changing the environment later would race other threads), and removed:
//! workers must not inherit them. gunicorn, for one, sends its own `READY=1` when it sees `NOTIFY_SOCKET`, and
//! a worker that took `LISTEN_FDS` would serve on anteroom's public socket. HTTP workers still get a
//! `LISTEN_FDS` of their own, for their private socket, from `anteroom exec-worker`.
//!
//! The protocol is small enough to speak here rather than through a crate: the `sd-notify` crate reads
//! `NOTIFY_SOCKET` from the environment at every call, which must be gone by then, and its `listen_fds`
//! hands out raw descriptor numbers. A notification is one datagram of `KEY=VALUE` lines to the unix socket
//! named by `NOTIFY_SOCKET` (a path, or `@name` in the abstract namespace); it is best effort, as in
//! `sd_notify(3)`: a lost one is logged at debug and never stops anteroom.

use std::ffi::OsString;
use std::os::fd::{OwnedFd, RawFd};
use std::os::unix::net::{SocketAddr, UnixDatagram};
use std::time::Duration;

use crate::sys::passfd;

/// The name of a passed socket (`FileDescriptorName=`) that carries HTTP; an unnamed one does too.
pub const HTTP: &str = "http";
/// The name of a passed socket that carries FastCGI (for nginx's `fastcgi_pass`).
pub const FASTCGI: &str = "fastcgi";
/// The name of a passed socket for the admin listener.
pub const ADMIN: &str = "admin";
/// The name of a passed socket for HAProxy's agent-check (`--agent`).
pub const AGENT: &str = "agent";

/// The variables an upgrade adds for the new process (see `upgrade`).
pub const UPGRADE_FROM: &str = "ANTEROOM_UPGRADE_FROM";
pub const UPGRADE_FD: &str = "ANTEROOM_UPGRADE_FD";
/// The indices (comma-separated) of passed unix sockets whose files the old anteroom had bound: the new one
/// removes them when it stops, as the old one would have.
pub const UPGRADE_OWNED: &str = "ANTEROOM_UPGRADE_OWNED";

/// What this process was given at start by systemd or by the anteroom it replaces.
#[derive(Default)]
pub struct Inherited {
    /// Passed listening sockets with their names (`http` when unnamed), in the order passed.
    pub listen_fds: Vec<(String, OwnedFd)>,
    /// Why passed sockets were not taken, to be logged once logging is up.
    pub ignored: Option<String>,
    pub notify: Option<Notifier>,
    /// Half of `WATCHDOG_USEC`: how often to send `WATCHDOG=1`.
    pub watchdog: Option<Duration>,
    /// `WATCHDOG_USEC` as given, to pass on to a new process at upgrade.
    pub watchdog_usec: Option<String>,
    /// Set when this process was started by an upgrade: the old process's pid and the channel to say ready on (and to take its connections from).
    pub upgrade: Option<(u32, OwnedFd)>,
    /// The indices in `listen_fds` of unix sockets whose files are ours to remove at stop (an upgrade's
    /// `ANTEROOM_UPGRADE_OWNED`; never systemd's).
    pub own_files: Vec<usize>,
}

impl Inherited {
    /// Reads and removes the variables. Call it once, before any other thread starts.
    pub fn take_from_env() -> Inherited {
        let var = |name: &str| {
            let v = std::env::var(name).ok();
            std::env::remove_var(name);
            v
        };
        let (fds, pid, names) = (var("LISTEN_FDS"), var("LISTEN_PID"), var("LISTEN_FDNAMES"));
        let notify_socket = std::env::var_os("NOTIFY_SOCKET");
        std::env::remove_var("NOTIFY_SOCKET");
        let (usec, wd_pid) = (var("WATCHDOG_USEC"), var("WATCHDOG_PID"));
        let (from, pipe, owned) = (var(UPGRADE_FROM), var(UPGRADE_FD), var(UPGRADE_OWNED));
        let own = std::process::id();

        let mut inherited = Inherited::default();
        match listen_fds(fds.as_deref(), pid.as_deref(), own) {
            Ok(0) => {}
            Ok(n) => match passfd::take_listen_fds(n) {
                Some(taken) => {
                    inherited.listen_fds = name_fds(taken, names.as_deref());
                }
                None => inherited.ignored = Some(format!("LISTEN_FDS={n}: not all open")),
            },
            Err(why) => inherited.ignored = Some(why),
        }
        let passed = inherited.listen_fds.len();
        inherited.upgrade = from
            .and_then(|f| f.parse::<u32>().ok())
            .zip(pipe.and_then(|p| p.parse::<RawFd>().ok()))
            .and_then(|(from, fd)| Some((from, passfd::take_channel(fd, passed)?)));
        if inherited.upgrade.is_some() {
            inherited.own_files = owned
                .unwrap_or_default()
                .split(',')
                .filter_map(|i| i.parse().ok())
                .collect();
        }
        inherited.notify = notify_socket.and_then(|v| Notifier::new(v).ok());
        let watchdog_usec = usec.filter(|_| wd_pid.is_none_or(|p| p == own.to_string()));
        inherited.watchdog = watchdog_usec
            .as_deref()
            .and_then(|u| u.parse::<u64>().ok())
            .filter(|u| *u > 0)
            .map(|u| Duration::from_micros(u / 2));
        inherited.watchdog_usec = watchdog_usec;
        inherited
    }
}

/// How many sockets `LISTEN_FDS` passes to process `own`: 0 when none, an error when the variables are
/// malformed or meant for another process.
fn listen_fds(fds: Option<&str>, pid: Option<&str>, own: u32) -> Result<usize, String> {
    let Some(fds) = fds else {
        return Ok(0);
    };
    let n: usize = fds
        .parse()
        .map_err(|_| format!("LISTEN_FDS={fds:?} is not a number"))?;
    match pid.map(str::parse::<u32>) {
        Some(Ok(p)) if p == own => Ok(n),
        Some(Ok(p)) => Err(format!("LISTEN_PID={p} is not this process ({own})")),
        _ => Err("LISTEN_FDS without a valid LISTEN_PID".into()),
    }
}

/// Pairs each descriptor with its name from `LISTEN_FDNAMES` (colon-separated); missing, empty or
/// systemd's default `unknown` names are `http`.
fn name_fds(fds: Vec<OwnedFd>, names: Option<&str>) -> Vec<(String, OwnedFd)> {
    let mut names = names.unwrap_or_default().split(':');
    fds.into_iter()
        .map(|fd| {
            let name = match names.next() {
                Some(n) if !n.is_empty() && n != "unknown" && n != "stored" => n.to_owned(),
                _ => HTTP.to_owned(),
            };
            (name, fd)
        })
        .collect()
}

/// Where `sd_notify` messages go.
pub struct Notifier {
    socket: UnixDatagram,
    addr: SocketAddr,
    /// `NOTIFY_SOCKET` as given, to pass on to a new process at upgrade.
    pub raw: OsString,
}

impl Notifier {
    pub fn new(raw: OsString) -> std::io::Result<Notifier> {
        use std::os::unix::ffi::OsStrExt;
        let bytes = raw.as_bytes();
        let addr = match bytes.strip_prefix(b"@") {
            Some(name) => {
                use std::os::linux::net::SocketAddrExt;
                SocketAddr::from_abstract_name(name)?
            }
            None => SocketAddr::from_pathname(std::path::Path::new(&raw))?,
        };
        Ok(Notifier {
            socket: UnixDatagram::unbound()?,
            addr,
            raw,
        })
    }

    /// Sends one message (`KEY=VALUE` lines). Never blocks for long: the datagram socket's buffer is
    /// systemd's, which reads it at once.
    pub fn send(&self, state: &str) {
        if let Err(e) = self.socket.send_to_addr(state.as_bytes(), &self.addr) {
            tracing::debug!("sd_notify {state:?}: {e}");
        }
    }
}

/// `CLOCK_MONOTONIC` in microseconds, which systemd wants beside `RELOADING=1` (`MONOTONIC_USEC=`).
pub fn monotonic_usec() -> u64 {
    let t = rustix::time::clock_gettime(rustix::time::ClockId::Monotonic);
    (t.tv_sec as u64) * 1_000_000 + (t.tv_nsec as u64) / 1_000
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn listen_fds_only_for_this_process() {
        assert_eq!(listen_fds(None, None, 7), Ok(0));
        assert_eq!(listen_fds(Some("2"), Some("7"), 7), Ok(2));
        assert!(listen_fds(Some("2"), Some("8"), 7).is_err());
        assert!(listen_fds(Some("2"), None, 7).is_err());
        assert!(listen_fds(Some("x"), Some("7"), 7).is_err());
    }

    #[test]
    fn names_default_to_http() {
        let fd = || std::fs::File::open("/dev/null").unwrap().into();
        let named = name_fds(vec![fd(), fd(), fd()], Some("fastcgi::unknown"));
        let names: Vec<_> = named.iter().map(|(n, _)| n.as_str()).collect();
        assert_eq!(names, ["fastcgi", "http", "http"]);
        assert_eq!(name_fds(vec![fd()], None)[0].0, "http");
    }

    #[test]
    fn notifications_arrive() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("notify");
        let rx = UnixDatagram::bind(&path).unwrap();
        let n = Notifier::new(path.into_os_string()).unwrap();
        n.send("READY=1\nSTATUS=up");
        let mut buf = [0u8; 64];
        let len = rx.recv(&mut buf).unwrap();
        assert_eq!(&buf[..len], b"READY=1\nSTATUS=up");
        assert!(monotonic_usec() > 0);
    }
}
