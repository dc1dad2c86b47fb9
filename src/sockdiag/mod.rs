//! Listening sockets and their kernel accept queues, for any server on this machine (`anteroom sockets`).
//!
//! anteroom exists because requests that wait in the kernel's listen backlog are invisible: nothing logs
//! them, no server counts them, and when the backlog is full the kernel drops connections quietly. This
//! module makes that backlog visible for every listening socket, whichever server owns it (Apache,
//! gunicorn, Starman, php-fpm, anteroom itself), so the problem can be seen before it is solved.
//!
//! Why not ask the servers? The ones that report a "listen queue" at all (php-fpm's status page, uWSGI's
//! stats) read it with the `TCP_INFO` socket option, which exists only for TCP: on a unix socket, where
//! php-fpm and uWSGI usually sit behind nginx, their listen queue is always 0, however long it really is.
//! `ss -l` does know (its Recv-Q and Send-Q columns mean "waiting to be accepted" and "backlog" for a
//! listener, not bytes), but only to those who know where to look. This reads the same numbers the way
//! `ss` does, through netlink `sock_diag` (`inet_diag` for TCP over IPv4 and IPv6, `unix_diag` for unix
//! stream sockets), which works for every socket kind and needs no privilege for the sockets of our own
//! network namespace. Owners come from `/proc/*/fd`, where permissions allow.
//!
//! The backlog a server asks for in `listen(2)` is silently cut to `net.core.somaxconn`; a backlog equal
//! to it was probably cut, so it is marked. The kernel's `ListenOverflows` and `ListenDrops` counters
//! say whether TCP connections have already been lost to a full queue.

mod cli;
mod exporter;
mod netlink;
mod procfs;

use std::fmt;
use std::io;

pub use cli::{run, SocketsArgs};

/// One listening socket, as the kernel sees it.
#[derive(Debug, Clone, serde::Serialize)]
pub struct ListenSocket {
    pub kind: Kind,
    /// `127.0.0.1:8000`, `[::1]:80`, `/run/x.sock`, or `@name` for an abstract unix name.
    pub local: String,
    /// Connections the kernel has completed that the server has not yet accepted.
    pub queued: u32,
    /// The effective backlog: what `listen(2)` asked for, after the kernel clamped it.
    pub backlog: u32,
    /// The socket's inode, as in `/proc/PID/fd/N -> socket:[INODE]`.
    pub inode: u64,
    pub pid: Option<u32>,
    pub process: Option<String>,
}

impl ListenSocket {
    /// How full the accept queue is, rounded down, so that 100 means really full. A TCP queue holds one
    /// more than its backlog, so this can exceed 100; a backlog of 0 still admits one connection.
    pub fn fill_percent(&self) -> u32 {
        let percent = u64::from(self.queued) * 100 / u64::from(self.backlog.max(1));
        u32::try_from(percent).unwrap_or(u32::MAX)
    }

    /// The backlog equals somaxconn: whatever the server asked for was probably more, and was cut.
    pub fn clamped(&self, somaxconn: Option<u32>) -> bool {
        somaxconn == Some(self.backlog)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Kind {
    Tcp,
    Tcp6,
    Unix,
}

impl fmt::Display for Kind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Kind::Tcp => "tcp",
            Kind::Tcp6 => "tcp6",
            Kind::Unix => "unix",
        })
    }
}

#[derive(Debug, thiserror::Error)]
pub enum SockDiagError {
    #[error("cannot open a netlink sock_diag socket (this needs Linux): {0}")]
    Open(#[source] io::Error),
    #[error("cannot send the {what} dump request to the kernel: {source}")]
    Send {
        what: &'static str,
        #[source]
        source: io::Error,
    },
    #[error("cannot read the kernel's {what} dump: {source}")]
    Recv {
        what: &'static str,
        #[source]
        source: io::Error,
    },
    #[error("the kernel refused the {what} dump: {source}")]
    Refused {
        what: &'static str,
        #[source]
        source: io::Error,
    },
    #[error("the kernel's {what} dump is malformed: {detail}")]
    Malformed { what: &'static str, detail: String },
    #[error("cannot write the output: {0}")]
    Output(#[source] io::Error),
    #[error("--serve {addr}: cannot listen there: {source}")]
    Bind {
        addr: std::net::SocketAddr,
        #[source]
        source: io::Error,
    },
    #[error("cannot start the exporter: {0}")]
    Serve(#[source] io::Error),
}

/// Every listening TCP (IPv4, IPv6) and unix stream socket of this network namespace, without owners:
/// one netlink round trip per kind, cheap enough to call every second.
pub fn listening_sockets() -> Result<Vec<ListenSocket>, SockDiagError> {
    let sock = netlink::DiagSocket::open()?;
    let mut all = Vec::new();
    all.extend(sock.dump_tcp(netlink::Family::V4, 1)?);
    all.extend(sock.dump_tcp(netlink::Family::V6, 2)?);
    all.extend(sock.dump_unix(3)?);
    Ok(all)
}

/// Fills `pid` and `process` from `/proc`, where permissions allow; sockets of processes we may not look
/// into keep `None`. Costs a readlink per open file descriptor on the machine.
pub fn attach_owners(sockets: &mut [ListenSocket]) {
    let wanted = sockets.iter().map(|s| s.inode).collect();
    let owners = procfs::owners(procfs::PROC, &wanted);
    for s in sockets {
        if let Some(o) = owners.get(&s.inode) {
            s.pid = Some(o.pid);
            s.process = o.name.clone();
        }
    }
}

/// `net.core.somaxconn`: the most any `listen(2)` backlog can be in this network namespace.
pub fn somaxconn() -> Option<u32> {
    procfs::somaxconn(procfs::PROC)
}

/// `(ListenOverflows, ListenDrops)` since boot, from `/proc/net/netstat`: TCP connections the kernel
/// lost because an accept queue was full (overflows), or for any reason while listening (drops).
pub fn listen_counters() -> Option<(u64, u64)> {
    procfs::listen_counters(procfs::PROC)
}

/// The accept queue of one unix listening socket, by inode: how many connections wait for `accept()`.
/// `None` when no listening unix socket has that inode (any more).
pub fn unix_listener_queue(inode: u64) -> Result<Option<u32>, SockDiagError> {
    let sock = netlink::DiagSocket::open()?;
    Ok(sock
        .dump_unix(1)?
        .into_iter()
        .find(|s| s.inode == inode)
        .map(|s| s.queued))
}

/// A process that holds a socket, by pid and name.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Holder {
    pub pid: u32,
    pub name: Option<String>,
}

/// The processes in the tree under `root` (itself included) that hold the socket with this inode, lowest
/// pid first: who may accept on a listening socket handed to `root`. Processes we may not look into are
/// left out.
pub fn tree_holders(root: u32, inode: u64) -> Vec<Holder> {
    procfs::tree_holders(procfs::PROC, root, inode)
        .into_iter()
        .map(|o| Holder {
            pid: o.pid,
            name: o.name,
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sock(queued: u32, backlog: u32) -> ListenSocket {
        ListenSocket {
            kind: Kind::Tcp,
            local: "127.0.0.1:1".into(),
            queued,
            backlog,
            inode: 1,
            pid: None,
            process: None,
        }
    }

    #[test]
    fn fill_is_rounded_down_and_may_pass_100() {
        assert_eq!(sock(5, 7).fill_percent(), 71);
        assert_eq!(sock(127, 128).fill_percent(), 99);
        assert_eq!(sock(128, 128).fill_percent(), 100);
        assert_eq!(sock(8, 7).fill_percent(), 114);
        assert_eq!(sock(0, 0).fill_percent(), 0);
        assert_eq!(sock(1, 0).fill_percent(), 100);
        assert_eq!(sock(u32::MAX, 0).fill_percent(), u32::MAX);
    }

    #[test]
    fn clamped_means_equal_to_somaxconn() {
        assert!(sock(0, 4096).clamped(Some(4096)));
        assert!(!sock(0, 4095).clamped(Some(4096)));
        assert!(!sock(0, 4096).clamped(None));
    }

    #[test]
    fn kind_serializes_lowercase() {
        assert_eq!(Kind::Tcp6.to_string(), "tcp6");
        let v = serde_json::to_value(sock(1, 2)).unwrap();
        assert_eq!(v["kind"], "tcp");
        assert_eq!(v["pid"], serde_json::Value::Null);
    }
}
