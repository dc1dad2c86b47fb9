//! Replacing the running binary without losing a request (SIGUSR2).
//!
//! The old process starts the binary as it is on disk now, with the same arguments, and passes it its
//! listening sockets as systemd would (`LISTEN_FDS`, `LISTEN_FDNAMES`, `LISTEN_PID`), so the kernel's
//! accept queues are never closed: connections that arrive meanwhile wait in them for whichever process
//! accepts first. The new process starts its own workers; once one is ready it says so, and the old process
//! stops accepting and finishes its queue and running requests (the graceful stop of SIGTERM) without
//! removing the unix socket files the new process now serves on.
//!
//! The new process says it is ready on a channel of its own (`ANTEROOM_UPGRADE_FD`, a unix socket pair)
//! rather than with a signal to the old pid: the channel cannot reach the wrong process, carries the new pid,
//! and ends (EOF) the moment the new process dies, so a failed start is noticed at once instead of at the
//! timeout. If it is not ready within `--spawn-timeout`, the old process stops it and keeps serving.
//!
//! ## Kept-alive connections go with the sockets
//! Closing a kept-alive connection that is idle races its client: nginx may be sending a request on it at
//! that instant. It retries an idempotent request elsewhere, but answers a POST with 502 (found by the
//! upgrade test behind nginx's `fastcgi_pass`: one POST in 41,742). FastCGI has no `Connection: close` to
//! say it ahead. So the old process closes none: once the new one is ready, each connection that is idle
//! (nothing of a next request read yet) is passed to the new process through the same channel (one
//! `SCM_RIGHTS` message each, [`Handover`]), and a busy one is passed as soon as its last answer is written.
//! Bytes the client sent meanwhile wait in the kernel's socket buffer, which moves with the descriptor, so
//! nothing is lost and the client never sees the change. The new process adopts each as if it had accepted
//! it ([`receive`]). What the front knew of a connection that the socket does not say goes with it in
//! the same message (the client an HTTP connection's PROXY protocol header named, which the new process
//! does not read again).
//!
//! `LISTEN_PID` must be the new process's own pid, known only after fork: as for HTTP workers, the child
//! first runs `NEW-BINARY exec-worker -- NEW-BINARY ARGS...`, which sets it and execs, keeping the pid.
//!
//! `/proc/self/exe` names the file this process was started from; when that file has since been replaced
//! (a package upgrade renames the new file over it), the link reads `PATH (deleted)`: the path, without the
//! suffix, is the new file, which is what is started.

use std::ffi::OsString;
use std::io::{self, Write};
use std::os::fd::{AsFd, OwnedFd};
use std::path::PathBuf;
use std::process::Stdio;
use std::sync::Arc;
use std::time::Duration;

use tokio::io::Interest;
use tokio::net::UnixDatagram;
use tokio::process::{Child, Command};

use crate::sys::passfd;
use crate::systemd::{UPGRADE_FD, UPGRADE_FROM, UPGRADE_OWNED};

#[derive(Debug, thiserror::Error)]
pub enum UpgradeError {
    #[error("cannot find this process's binary: {0}")]
    Exe(std::io::Error),
    #[error("the binary {} is not there any more", .0.display())]
    Missing(PathBuf),
    #[error("an argument is not valid UTF-8: {0:?}")]
    Argument(OsString),
    #[error("cannot pass the listening sockets: {0}")]
    Pass(std::io::Error),
    #[error("cannot start {}: {source}", exe.display())]
    Spawn {
        exe: PathBuf,
        source: std::io::Error,
    },
    #[error("the new process (pid {pid}) exited before it was ready ({status}); see its log lines above")]
    Exited { pid: u32, status: String },
    #[error("the new process (pid {pid}) was not ready within {timeout:?} (--spawn-timeout); it is stopped")]
    Timeout { pid: u32, timeout: Duration },
}

/// A listening socket to pass, under its `LISTEN_FDNAMES` name.
pub struct Pass {
    pub name: &'static str,
    pub fd: OwnedFd,
    /// A unix socket whose file this process bound (and would remove at stop): the new process removes it.
    pub owns_file: bool,
}

/// What the old process passes on besides its sockets.
#[derive(Default)]
pub struct Context {
    /// `NOTIFY_SOCKET`, so that the new process can tell systemd it is the main process now.
    pub notify_socket: Option<OsString>,
    pub watchdog_usec: Option<String>,
}

/// The binary to start: what `/proc/self/exe` points at, as the file at that path is now.
pub fn current_exe() -> Result<PathBuf, UpgradeError> {
    let link = std::fs::read_link("/proc/self/exe").map_err(UpgradeError::Exe)?;
    let path = match link.to_str().and_then(|s| s.strip_suffix(" (deleted)")) {
        Some(p) => PathBuf::from(p),
        None => link,
    };
    if !path.is_file() {
        return Err(UpgradeError::Missing(path));
    }
    Ok(path)
}

/// The new process, ready: its pid, and the channel to hand it the idle connections.
pub struct Ready {
    pub pid: u32,
    pub handover: Handover,
}

/// Starts the new process with `sockets` and waits until it is ready or has failed, at most `timeout`. On
/// failure the new process is stopped, and the caller keeps serving.
pub async fn start(
    sockets: Vec<Pass>,
    ctx: Context,
    timeout: Duration,
) -> Result<Ready, UpgradeError> {
    use rustix::net::{socketpair, AddressFamily, SocketFlags, SocketType};
    let exe = current_exe()?;
    // SEQPACKET: one message per connection, never two run together nor one split.
    let flags = SocketFlags::CLOEXEC | SocketFlags::NONBLOCK;
    let (ours, theirs) = socketpair(AddressFamily::UNIX, SocketType::SEQPACKET, flags, None)
        .map_err(|e| UpgradeError::Pass(e.into()))?;
    let mut cmd = command(&exe, sockets, theirs, &ctx)?;
    let mut child = cmd.spawn().map_err(|source| UpgradeError::Spawn {
        exe: exe.clone(),
        source,
    })?;
    // Our copy of the other end goes with `cmd`: EOF then means the new process is gone.
    drop(cmd);
    let pid = child.id().unwrap_or(0);
    // Dropped before the outcome (this process is told to stop meanwhile): the new process stops too.
    let mut unready = StopOnDrop(pid);
    let channel = Arc::new(channel(ours).map_err(UpgradeError::Pass)?);
    let outcome = tokio::time::timeout(timeout, said_ready(&channel)).await;
    unready.0 = 0;
    match outcome {
        Ok(true) => Ok(Ready {
            pid,
            handover: Handover(channel),
        }),
        Ok(false) => Err(UpgradeError::Exited {
            pid,
            status: exit_status(&mut child, pid).await,
        }),
        Err(_) => {
            stop(&mut child, pid).await;
            Err(UpgradeError::Timeout { pid, timeout })
        }
    }
}

/// `EXE exec-worker -- EXE ARGS...` with `sockets` as fds 3.. and the channel's other end after them, and
/// the variables that say so.
fn command(
    exe: &std::path::Path,
    sockets: Vec<Pass>,
    channel: OwnedFd,
    ctx: &Context,
) -> Result<Command, UpgradeError> {
    let args = std::env::args_os()
        .skip(1)
        .map(|a| a.into_string().map_err(UpgradeError::Argument))
        .collect::<Result<Vec<_>, _>>()?;
    let names: Vec<&str> = sockets.iter().map(|p| p.name).collect();
    let owned: Vec<String> = (sockets.iter().enumerate())
        .filter(|(_, p)| p.owns_file)
        .map(|(i, _)| i.to_string())
        .collect();
    tracing::info!(exe = %exe.display(), sockets = %names.join(","), "upgrade: starting the new binary");
    let mut cmd = Command::new(exe);
    cmd.arg("exec-worker").arg("--").arg(exe).args(&args);
    cmd.env("LISTEN_FDS", names.len().to_string())
        .env("LISTEN_FDNAMES", names.join(":"))
        .env(UPGRADE_FROM, std::process::id().to_string())
        .env(
            UPGRADE_FD,
            (passfd::FIRST as usize + names.len()).to_string(),
        )
        .env(UPGRADE_OWNED, owned.join(","))
        .env_remove("LISTEN_PID")
        .env_remove("WATCHDOG_PID");
    if let Some(s) = &ctx.notify_socket {
        cmd.env("NOTIFY_SOCKET", s);
    }
    if let Some(u) = &ctx.watchdog_usec {
        cmd.env("WATCHDOG_USEC", u);
    }
    // Its log goes where ours does: one journal, one terminal.
    cmd.stdin(Stdio::null());
    let mut fds: Vec<OwnedFd> = sockets.into_iter().map(|p| p.fd).collect();
    fds.push(channel);
    passfd::pass_fds(&mut cmd, fds);
    Ok(cmd)
}

/// The channel (a non-blocking SEQPACKET socket) on the runtime. tokio has no type for SEQPACKET; its
/// datagram socket is the nearest, used only for readiness: every message goes through `passfd`.
fn channel(fd: OwnedFd) -> io::Result<UnixDatagram> {
    UnixDatagram::from_std(std::os::unix::net::UnixDatagram::from(fd))
}

/// Receives one message from the channel, waiting for it: its length and the descriptor it carried.
async fn recv(channel: &UnixDatagram, buf: &mut [u8]) -> io::Result<(usize, Option<OwnedFd>)> {
    loop {
        channel.readable().await?;
        match channel.try_io(Interest::READABLE, || {
            passfd::recv_with_fd(channel.as_fd(), buf)
        }) {
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
            got => return got,
        }
    }
}

/// Whether the new process said "READY PID" before closing the channel (its first message).
async fn said_ready(channel: &UnixDatagram) -> bool {
    let mut buf = [0u8; 64];
    matches!(recv(channel, &mut buf).await, Ok((n, _)) if buf[..n].starts_with(b"READY "))
}

/// The most a front may say of a connection it hands over, besides its kind.
pub const MAX_NOTE: usize = 240;

/// A client connection handed to the new process: which front serves it there.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Handed {
    Http,
    FastCgi,
}

impl Handed {
    /// The message that carries the connection's descriptor.
    fn wire(self) -> &'static [u8] {
        match self {
            Handed::Http => b"conn http",
            Handed::FastCgi => b"conn fastcgi",
        }
    }

    /// The kind, and the note after it (empty when none: see [`Handover::send`]).
    fn parse(message: &[u8]) -> Option<(Handed, &[u8])> {
        let (word, note) = match message.iter().position(|&b| b == b'\n') {
            Some(i) => (&message[..i], &message[i + 1..]),
            None => (message, &[][..]),
        };
        let kind = [Handed::Http, Handed::FastCgi]
            .into_iter()
            .find(|k| k.wire() == word)?;
        Some((kind, note))
    }
}

/// The old process's end of the channel once the new process is ready: the way out for idle connections.
#[derive(Clone)]
pub struct Handover(Arc<UnixDatagram>);

impl Handover {
    /// Passes `conn` to the new process as a connection of `kind`, with what the front knew of it that the
    /// socket does not say (`note`, at most [`MAX_NOTE`] bytes, its own format; empty for none). Once this
    /// returns, our descriptor may close: the connection stays open in the new process. `Err`: the new
    /// process is gone, or the channel failed; the caller closes the connection as a stop would.
    pub async fn send(&self, kind: Handed, note: &[u8], conn: OwnedFd) -> io::Result<()> {
        if note.len() > MAX_NOTE {
            return Err(io::Error::other("the note is too long to pass on"));
        }
        let mut message = kind.wire().to_vec();
        if !note.is_empty() {
            message.push(b'\n');
            message.extend_from_slice(note);
        }
        let c = &self.0;
        loop {
            c.writable().await?;
            match c.try_io(Interest::WRITABLE, || {
                passfd::send_with_fd(c.as_fd(), &message, conn.as_fd())
            }) {
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                sent => return sent,
            }
        }
    }
}

#[cfg(test)]
impl Handover {
    /// A hand-over whose other end is returned (as the new process would hold it), for tests.
    pub(crate) fn pair() -> (Handover, OwnedFd) {
        use rustix::net::{socketpair, AddressFamily, SocketFlags, SocketType};
        let flags = SocketFlags::CLOEXEC | SocketFlags::NONBLOCK;
        let (old, new) =
            socketpair(AddressFamily::UNIX, SocketType::SEQPACKET, flags, None).unwrap();
        (Handover(Arc::new(channel(old).unwrap())), new)
    }
}

/// In the new process: takes the connections the old process hands over, until it exits (the channel's
/// end), and gives each to `adopt`. A pipe instead of a socket (an older anteroom started this one) carries
/// none: this returns at once.
pub async fn receive(channel: OwnedFd, mut adopt: impl FnMut(Handed, &[u8], OwnedFd)) {
    let is_socket = rustix::fs::fstat(&channel).is_ok_and(|st| {
        rustix::fs::FileType::from_raw_mode(st.st_mode) == rustix::fs::FileType::Socket
    });
    if !is_socket {
        return;
    }
    let Ok(channel) = self::channel(channel) else {
        return;
    };
    let mut buf = [0u8; 16 + MAX_NOTE];
    let mut adopted = 0u64;
    loop {
        match recv(&channel, &mut buf).await {
            Ok((n, Some(conn))) => match Handed::parse(&buf[..n]) {
                Some((kind, note)) => {
                    adopted += 1;
                    adopt(kind, note, conn);
                }
                None => tracing::warn!(
                    message = %String::from_utf8_lossy(&buf[..n]),
                    "upgrade: a connection of an unknown kind from the old process; closed"
                ),
            },
            Ok((0, None)) => {
                tracing::info!(adopted, "upgrade: the old process has exited");
                return;
            }
            Ok((_, None)) => {}
            Err(e) => {
                tracing::warn!(
                    adopted,
                    "upgrade: cannot take connections from the old process: {e}"
                );
                return;
            }
        }
    }
}

/// Sends SIGTERM to a new process that was not reported ready when the upgrade is abandoned (pid 0: none).
struct StopOnDrop(u32);

impl Drop for StopOnDrop {
    fn drop(&mut self) {
        if self.0 != 0 {
            let _ = crate::sys::process::kill(self.0, crate::sys::process::Signal::TERM);
        }
    }
}

/// How a new process that closed its pipe without saying ready ended; one still running is stopped.
async fn exit_status(child: &mut Child, pid: u32) -> String {
    match tokio::time::timeout(Duration::from_secs(5), child.wait()).await {
        Ok(Ok(s)) => s.to_string(),
        _ => {
            stop(child, pid).await;
            "it closed its readiness pipe and was stopped".into()
        }
    }
}

/// Stops a new process that did not become ready: SIGTERM (it stops its workers), then SIGKILL.
async fn stop(child: &mut Child, pid: u32) {
    let _ = crate::sys::process::kill(pid, crate::sys::process::Signal::TERM);
    if tokio::time::timeout(Duration::from_secs(10), child.wait())
        .await
        .is_err()
    {
        let _ = child.kill().await;
    }
}

/// In the new process: tells the old one that a worker is ready (`READY PID`). The channel stays open
/// until this process exits.
pub fn report_ready(channel: &OwnedFd) {
    let Ok(dup) = channel.try_clone() else {
        return;
    };
    let mut f = std::fs::File::from(dup);
    // One write, so one message: `writeln!` writes each piece by itself, and the old process reads only
    // the first message (the rest, left unread, made our end see a reset when it closed).
    let said = format!("READY {}\n", std::process::id());
    if let Err(e) = f.write_all(said.as_bytes()) {
        tracing::warn!("upgrade: cannot tell the old process we are ready: {e}");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_kind_reads_back_and_nothing_else_does() {
        for k in [Handed::Http, Handed::FastCgi] {
            assert_eq!(Handed::parse(k.wire()), Some((k, &b""[..])));
        }
        assert_eq!(
            Handed::parse(b"conn http\npeer=1.2.3.4:5"),
            Some((Handed::Http, &b"peer=1.2.3.4:5"[..]))
        );
        assert_eq!(Handed::parse(b"conn"), None);
        assert_eq!(Handed::parse(b"conn http peer"), None);
        assert_eq!(Handed::parse(b"READY 12"), None);
    }

    #[tokio::test]
    async fn a_connection_crosses_with_the_bytes_waiting_in_it() {
        use std::io::{Read, Write as _};
        let (handover, new) = Handover::pair();
        let (mut client, server) = std::os::unix::net::UnixStream::pair().unwrap();
        // Sent before the hand-over, read after it, by the other side.
        client.write_all(b"GET / HTTP/1.1\r\n\r\n").unwrap();
        handover
            .send(Handed::Http, b"a note", OwnedFd::from(server))
            .await
            .unwrap();
        drop(handover);
        let mut got = Vec::new();
        receive(new, |kind, note, fd| got.push((kind, note.to_vec(), fd))).await;
        assert_eq!(got.len(), 1, "one connection, then the end");
        let (kind, note, fd) = got.pop().unwrap();
        assert_eq!((kind, &note[..]), (Handed::Http, &b"a note"[..]));
        let mut server = std::os::unix::net::UnixStream::from(fd);
        server.set_nonblocking(false).unwrap();
        let mut buf = [0u8; 18];
        server.read_exact(&mut buf).unwrap();
        assert_eq!(&buf, b"GET / HTTP/1.1\r\n\r\n");
    }
}
