//! Binding the client-facing sockets: TCP or unix, with the backlog asked for.
//!
//! A unix socket path left behind by a run that died is replaced; one that a live process still answers on
//! is an error, so two anteroom instances never silently steal each other's traffic.
//!
//! A listener may also be inherited, already bound and listening: from systemd's socket activation or from
//! the anteroom this process replaces (`Listener::inherit`). Its unix socket file belongs to whoever made
//! it, so it is never removed here; and one this process made is left in place once it has been handed to
//! a new process (`Listener::keep_path`).

use std::io;
use std::net::SocketAddr;
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::fs::FileTypeExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use socket2::{Domain, Socket, Type};
use tokio::net::{TcpListener, UnixListener};

use crate::config::{ListenAddr, SocketAccess};

#[derive(Debug, thiserror::Error)]
pub enum BindError {
    #[error("{addr}: {source}")]
    Io { addr: ListenAddr, source: io::Error },
    #[error("unix:{}: a live process is listening on this socket", path.display())]
    InUse { path: PathBuf },
    #[error("unix:{}: exists and is not a socket; refusing to replace it", path.display())]
    NotASocket { path: PathBuf },
    #[error("{key}: cannot set it on unix:{}: {source}", path.display())]
    Access {
        key: &'static str,
        path: PathBuf,
        source: io::Error,
    },
    #[error("passed descriptor {fd}: {source}")]
    Inherit { fd: String, source: io::Error },
}

pub enum Listener {
    Tcp(TcpListener),
    Unix {
        listener: UnixListener,
        path: PathBuf,
        /// Whether dropping the listener removes the socket file: only when this process bound it and has
        /// not handed it over.
        remove: Arc<AtomicBool>,
    },
}

impl Listener {
    /// Binds `addr` with `backlog`; must be called inside the tokio runtime.
    pub fn bind(addr: &ListenAddr, backlog: u32) -> Result<Listener, BindError> {
        let io_err = |source| BindError::Io {
            addr: addr.clone(),
            source,
        };
        match addr {
            ListenAddr::Tcp(sa) => {
                let socket = tcp_socket(*sa, backlog as i32).map_err(io_err)?;
                let std: std::net::TcpListener = socket.into();
                Ok(Listener::Tcp(TcpListener::from_std(std).map_err(io_err)?))
            }
            ListenAddr::Unix(path) => {
                clear_stale_socket(path)?;
                let socket = crate::sys::fd::unix_listener(path, backlog as i32).map_err(io_err)?;
                let std: std::os::unix::net::UnixListener = socket.into();
                Ok(Listener::Unix {
                    listener: UnixListener::from_std(std).map_err(io_err)?,
                    path: path.clone(),
                    remove: Arc::new(AtomicBool::new(true)),
                })
            }
        }
    }

    /// A listener from a descriptor passed to this process (`LISTEN_FDS`), already bound and listening: a
    /// TCP or unix stream socket. Must be called inside the tokio runtime.
    pub fn inherit(fd: OwnedFd) -> io::Result<Listener> {
        let socket = Socket::from(fd);
        if socket.r#type()? != Type::STREAM || !socket.is_listener()? {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "not a listening stream socket (systemd: ListenStream= with Accept=no)",
            ));
        }
        socket.set_nonblocking(true)?;
        let local = socket.local_addr()?;
        if local.as_socket().is_some() {
            let std: std::net::TcpListener = socket.into();
            return Ok(Listener::Tcp(TcpListener::from_std(std)?));
        }
        // An abstract or unnamed unix socket has no path: it is shown as "@", and there is nothing to remove.
        let path = local
            .as_pathname()
            .map_or_else(|| PathBuf::from("@"), Path::to_path_buf);
        let std: std::os::unix::net::UnixListener = socket.into();
        Ok(Listener::Unix {
            listener: UnixListener::from_std(std)?,
            path,
            remove: Arc::new(AtomicBool::new(false)),
        })
    }

    /// A second descriptor for the same socket, to pass to another process (close-on-exec here).
    pub fn dup(&self) -> io::Result<OwnedFd> {
        match self {
            Listener::Tcp(l) => l.as_fd().try_clone_to_owned(),
            Listener::Unix { listener, .. } => listener.as_fd().try_clone_to_owned(),
        }
    }

    /// A switch that, turned off, keeps the socket file when the listener closes: for a unix listener handed
    /// to a new process, which serves on it from now on. `None` for TCP.
    pub fn keep_path(&self) -> Option<Arc<AtomicBool>> {
        match self {
            Listener::Tcp(_) => None,
            Listener::Unix { remove, .. } => Some(remove.clone()),
        }
    }

    pub fn local_addr(&self) -> ListenAddr {
        match self {
            Listener::Tcp(l) => l
                .local_addr()
                .map(ListenAddr::Tcp)
                .unwrap_or(ListenAddr::Tcp(SocketAddr::from(([0, 0, 0, 0], 0)))),
            Listener::Unix { path, .. } => ListenAddr::Unix(path.clone()),
        }
    }
}

impl Drop for Listener {
    fn drop(&mut self) {
        if let Listener::Unix { path, remove, .. } = self {
            if remove.load(Ordering::Acquire) {
                let _ = std::fs::remove_file(path);
            }
        }
    }
}

fn tcp_socket(addr: SocketAddr, backlog: i32) -> io::Result<Socket> {
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM, None)?;
    socket.set_reuse_address(true)?;
    if addr.is_ipv6() {
        // [::]:80 and 0.0.0.0:80 given together must both bind.
        socket.set_only_v6(true)?;
    }
    socket.set_tcp_nodelay(true)?;
    socket.bind(&addr.into())?;
    socket.listen(backlog)?;
    socket.set_nonblocking(true)?;
    Ok(socket)
}

fn clear_stale_socket(path: &Path) -> Result<(), BindError> {
    let meta = match std::fs::symlink_metadata(path) {
        Ok(m) => m,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
        Err(source) => {
            return Err(BindError::Io {
                addr: ListenAddr::Unix(path.to_owned()),
                source,
            })
        }
    };
    if !meta.file_type().is_socket() {
        return Err(BindError::NotASocket {
            path: path.to_owned(),
        });
    }
    match std::os::unix::net::UnixStream::connect(path) {
        Ok(_) => Err(BindError::InUse {
            path: path.to_owned(),
        }),
        Err(_) => std::fs::remove_file(path).map_err(|source| BindError::Io {
            addr: ListenAddr::Unix(path.to_owned()),
            source,
        }),
    }
}

/// While it lives, sockets are created with mode 0600 at most; dropping it restores the umask. Held around
/// the binds when `--listen-mode` is given, so that a socket is never open to more than anteroom before
/// [`set_access`] gives it the mode asked for (bind(2) takes no mode; only the umask narrows it).
pub struct PrivateUmask(u32);

impl PrivateUmask {
    pub fn hold(access: &SocketAccess) -> Option<PrivateUmask> {
        access.mode.map(|_| {
            let old = crate::sys::privilege::umask(0o177);
            crate::sys::privilege::umask(old | 0o177);
            PrivateUmask(old)
        })
    }
}

impl Drop for PrivateUmask {
    fn drop(&mut self) {
        crate::sys::privilege::umask(self.0);
    }
}

/// `--listen-owner`, `--listen-group` and `--listen-mode` on the unix sockets of the public listeners (TCP
/// ones have no such thing), so that for instance only nginx's group may connect. Owner and group first:
/// the mode then applies to the right ones.
pub fn set_access<'a>(
    listeners: impl IntoIterator<Item = &'a Listener>,
    access: &SocketAccess,
) -> Result<(), BindError> {
    use std::os::unix::fs::PermissionsExt;
    if !access.is_set() {
        return Ok(());
    }
    for l in listeners {
        let Listener::Unix { path, .. } = l else {
            continue;
        };
        let err = |key, source| BindError::Access {
            key,
            path: path.clone(),
            source,
        };
        if access.owner.is_some() || access.group.is_some() {
            let key = if access.owner.is_some() {
                "listen-owner"
            } else {
                "listen-group"
            };
            std::os::unix::fs::chown(path, access.owner, access.group).map_err(|e| err(key, e))?;
        }
        if let Some(mode) = access.mode {
            std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))
                .map_err(|e| err("listen-mode", e))?;
        }
    }
    Ok(())
}

/// The kernel's cap on listen backlogs in this network namespace, if readable.
pub fn somaxconn() -> Option<u32> {
    std::fs::read_to_string("/proc/sys/net/core/somaxconn")
        .ok()?
        .trim()
        .parse()
        .ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn stale_unix_socket_is_replaced_live_one_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s.sock");
        let addr = ListenAddr::Unix(path.clone());
        // A socket file nobody listens on: what a killed run leaves behind.
        drop(std::os::unix::net::UnixListener::bind(&path).unwrap());
        assert!(path.exists());
        let live = Listener::bind(&addr, 16).unwrap();
        match Listener::bind(&addr, 16) {
            Err(BindError::InUse { .. }) => {}
            other => panic!("expected InUse, got {:?}", other.err()),
        }
        drop(live);
        assert!(!path.exists(), "our own socket file is removed on drop");
        std::fs::write(&path, "not a socket").unwrap();
        assert!(matches!(
            Listener::bind(&addr, 16),
            Err(BindError::NotASocket { .. })
        ));
    }

    #[tokio::test]
    async fn inherited_and_handed_over_socket_files_stay() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s.sock");
        let passed = std::os::unix::net::UnixListener::bind(&path).unwrap();
        let l = Listener::inherit(OwnedFd::from(passed)).unwrap();
        assert_eq!(l.local_addr(), ListenAddr::Unix(path.clone()));
        drop(l);
        assert!(path.exists(), "whoever made it removes it");
        std::fs::remove_file(&path).unwrap();
        let own = Listener::bind(&ListenAddr::Unix(path.clone()), 16).unwrap();
        own.keep_path().unwrap().store(false, Ordering::Release);
        drop(own);
        assert!(path.exists(), "handed over: the new process serves on it");

        let tcp = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = tcp.local_addr().unwrap();
        let l = Listener::inherit(OwnedFd::from(tcp)).unwrap();
        assert_eq!(l.local_addr(), ListenAddr::Tcp(addr));
        assert!(l.keep_path().is_none());
        let udp = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        assert!(Listener::inherit(OwnedFd::from(udp)).is_err());
    }
}
