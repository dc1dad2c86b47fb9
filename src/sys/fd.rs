//! File descriptors: the demo worker's inherited listener, unix listeners (public and the workers'),
//! readiness, inodes, and the size of the fd table.

use std::io;
use std::os::fd::{AsFd, FromRawFd, RawFd};
use std::os::unix::net::UnixListener;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

/// Whether fd 0 has been taken as the FastCGI listener.
static FD0_TAKEN: AtomicBool = AtomicBool::new(false);

/// The listening socket a FastCGI worker inherits as fd 0 (FCGI_LISTENSOCK_FILENO), the first time it
/// is asked for; `None` after that, since the first listener owns (and will close) fd 0.
pub fn take_fastcgi_listener() -> Option<UnixListener> {
    if FD0_TAKEN.swap(true, Ordering::AcqRel) {
        return None;
    }
    // SAFETY: anteroom's pool gives every FastCGI worker its listening socket as fd 0, and nothing else in
    // the process owns fd 0 (the worker never reads stdin); the flag above makes this the only owner.
    Some(unsafe { UnixListener::from_raw_fd(0) })
}

/// Waits at most `timeout` for `fd` to become readable (for a listener: a connection to accept).
/// `Ok(false)` when the time ran out.
pub fn wait_readable(fd: impl AsFd, timeout: Duration) -> io::Result<bool> {
    use rustix::event::{poll, PollFd, PollFlags, Timespec};
    let mut fds = [PollFd::new(&fd, PollFlags::IN)];
    let timeout = Timespec::try_from(timeout).ok();
    Ok(poll(&mut fds, timeout.as_ref())? > 0)
}

/// The inode of the file or socket behind `fd`.
pub fn inode(fd: impl AsFd) -> Option<u64> {
    rustix::fs::fstat(fd).ok().map(|st| st.st_ino)
}

/// Makes the process's fd table hold descriptor number `n`: the kernel grows the table to fit a duplicate
/// of stderr at `n` or above, which is closed again at once (the table never shrinks).
pub fn grow_fd_table(n: RawFd) -> io::Result<()> {
    let dup = rustix::io::fcntl_dupfd_cloexec(io::stderr(), n)?;
    drop(dup);
    Ok(())
}

/// A unix listener bound at `path` with `backlog`, non-blocking: a public `--listen unix:` socket, or a
/// worker's private one (below both `front` and `pool`, which each make them).
pub fn unix_listener(path: &std::path::Path, backlog: i32) -> io::Result<socket2::Socket> {
    use socket2::{Domain, SockAddr, Socket, Type};
    let socket = Socket::new(Domain::UNIX, Type::STREAM, None)?;
    socket.bind(&SockAddr::unix(path)?)?;
    socket.listen(backlog)?;
    socket.set_nonblocking(true)?;
    Ok(socket)
}

/// Whether `fd` (a connected socket) has a byte to read: `Ok(true)` with data waiting, `Ok(false)` at the
/// end of the stream, `WouldBlock` when nothing has arrived. The byte stays in the socket (`MSG_PEEK`), so
/// a caller can learn that the peer spoke before it gives a buffer to what it will say.
pub fn has_byte(fd: impl AsFd) -> io::Result<bool> {
    use rustix::net::{recv, RecvFlags};
    let mut byte = [0u8; 1];
    let (n, _) = recv(fd, &mut byte[..], RecvFlags::PEEK | RecvFlags::DONTWAIT)?;
    Ok(n > 0)
}
