//! The worker as a process: its socket, its output, stopping it, and the delay before restarting it.

use std::collections::VecDeque;
use std::os::fd::OwnedFd;
use std::path::Path;
use std::process::ExitStatus;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, AsyncRead, AsyncReadExt, BufReader};

use crate::sys::process::Signal;
use crate::worker::Link;

/// How many of a worker's last output lines are kept for its crash report.
pub(super) const TAIL_LINES: usize = 20;

pub(super) fn socket_inode(fd: &OwnedFd) -> Option<u64> {
    crate::sys::fd::inode(fd)
}

/// SIGTERM, then SIGKILL if the worker has not exited within the grace period.
pub(super) async fn terminate(
    pid: u32,
    grace: Duration,
    link: &mut Link,
    exit: &mut std::pin::Pin<&mut impl std::future::Future<Output = std::io::Result<ExitStatus>>>,
) -> std::io::Result<ExitStatus> {
    // Our connection first: php-cgi, blocked reading a kept-alive connection, restarts the read after
    // SIGTERM and would only stop at SIGKILL; at EOF it returns to accept(), where SIGTERM ends it.
    link.reset();
    // The whole process group: a worker that is itself a small manager (plackup's FCGI::ProcManager,
    // gunicorn's arbiter) must not leave its children behind.
    signal(pid, libc::SIGTERM);
    signal_group(pid, libc::SIGTERM);
    match tokio::time::timeout(grace, exit.as_mut()).await {
        Ok(st) => st,
        Err(_) => {
            signal_group(pid, libc::SIGKILL);
            signal(pid, libc::SIGKILL);
            exit.as_mut().await
        }
    }
}

/// Signals the process group the worker leads (it was made its own group at spawn).
/// The group id is the worker's pid, which the kernel does not reuse while the group has members.
pub(super) fn signal_group(pid: u32, sig: libc::c_int) {
    if let Some(sig) = Signal::from_named_raw(sig) {
        let _ = crate::sys::process::kill_group(pid, sig);
    }
}

/// Signals the worker itself: our own unreaped child, so its pid cannot have been reused.
pub(super) fn signal(pid: u32, sig: libc::c_int) {
    if let Some(sig) = Signal::from_named_raw(sig) {
        let _ = crate::sys::process::kill(pid, sig);
    }
}

/// The worker's private listening socket, blocking as apps expect of an inherited listener.
///
/// Mode 0600 whatever the umask, in a 0700 directory: only anteroom's account (and the worker's, `user`,
/// to which both are handed when anteroom is root) may connect, so no other local user can send a worker
/// requests that bypass the queue and the front's limits.
pub(super) fn worker_socket(
    path: &Path,
    user: Option<&crate::config::Account>,
) -> std::io::Result<OwnedFd> {
    use std::os::unix::fs::PermissionsExt;
    let _ = std::fs::remove_file(path);
    let s = crate::sys::fd::unix_listener(path, 64)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))?;
    if let Some(a) = user {
        if crate::sys::process::effective_uid() == 0 {
            std::os::unix::fs::chown(path, Some(a.uid), Some(a.gid))?;
        }
    }
    s.set_nonblocking(false)?;
    Ok(s.into())
}

/// Logs a worker's output line by line and keeps the last lines for its crash report.
pub(super) async fn log_lines(
    stream: impl AsyncRead + Unpin,
    slot: usize,
    pid: u32,
    name: &'static str,
    tail: Arc<Mutex<VecDeque<String>>>,
) {
    let mut reader = BufReader::with_capacity(8192, stream);
    let mut buf = Vec::with_capacity(256);
    loop {
        buf.clear();
        // Lines are capped so that a worker printing without newlines cannot grow our memory.
        match (&mut reader).take(8192).read_until(b'\n', &mut buf).await {
            Ok(0) | Err(_) => break,
            Ok(_) => {}
        }
        let line = String::from_utf8_lossy(&buf);
        let line = line.trim_end();
        if line.is_empty() {
            continue;
        }
        tracing::info!(target: "worker", slot, pid, stream = name, "{line}");
        let mut t = crate::sync::lock(&tail);
        if t.len() == TAIL_LINES {
            t.pop_front();
        }
        t.push_back(line.to_string());
    }
}

/// Exponential backoff with jitter: 0.1 s doubling to 30 s.
pub(super) struct Backoff {
    next: Duration,
}

impl Backoff {
    const FIRST: Duration = Duration::from_millis(100);
    const MAX: Duration = Duration::from_secs(30);

    pub(super) fn new() -> Backoff {
        Backoff { next: Self::FIRST }
    }

    pub(super) fn next(&mut self) -> Duration {
        let d = self.next;
        self.next = (self.next * 2).min(Self::MAX);
        // +-20%, so that slots failing together do not restart in lockstep.
        d.mul_f64(0.8 + fastrand::f64() * 0.4)
    }

    /// The next delay, before jitter.
    pub(super) fn upcoming(&self) -> Duration {
        self.next
    }

    pub(super) fn reset(&mut self) {
        self.next = Self::FIRST;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_grows_and_caps() {
        let mut b = Backoff::new();
        let first = b.next();
        assert!(first >= Duration::from_millis(80) && first <= Duration::from_millis(120));
        for _ in 0..20 {
            b.next();
        }
        assert!(b.next() <= Duration::from_secs(36));
        b.reset();
        assert!(b.next() <= Duration::from_millis(120));
    }
}
