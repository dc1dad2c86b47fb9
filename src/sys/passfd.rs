//! Descriptors that cross an exec: the listening sockets systemd (or the anteroom being replaced) passes
//! as fds 3, 4... with `LISTEN_FDS`, the upgrade's channel, and putting them in place in a child; and
//! descriptors that cross between running processes: an upgrade's idle client connections, one per message
//! on that channel (`SCM_RIGHTS`).

use std::io;
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::sync::atomic::{AtomicBool, Ordering};

use tokio::process::Command;

/// The first passed descriptor (`SD_LISTEN_FDS_START`).
pub const FIRST: RawFd = 3;

/// Whether the passed descriptors have been taken: each may have one owner only.
static TAKEN: AtomicBool = AtomicBool::new(false);

/// Takes ownership of fds `3 .. 3 + n` (systemd's `LISTEN_FDS` convention), marking each close-on-exec so
/// that workers never inherit them. `None` if they were taken before or one of them is not open. Call it
/// only once `LISTEN_PID` says the descriptors are meant for this process.
pub fn take_listen_fds(n: usize) -> Option<Vec<OwnedFd>> {
    let n = RawFd::try_from(n).ok().filter(|n| *n <= 4096)?;
    if TAKEN.swap(true, Ordering::AcqRel) {
        return None;
    }
    let fds = FIRST..FIRST + n;
    // SAFETY: fcntl on a descriptor number only reads or sets its flags; a closed one fails with EBADF.
    if fds
        .clone()
        .any(|fd| unsafe { libc::fcntl(fd, libc::F_SETFD, libc::FD_CLOEXEC) } < 0)
    {
        return None;
    }
    // SAFETY: each of these is open (checked above) and was passed to this process to own: LISTEN_PID names
    // us, nothing else in the process uses fds 3 and up before this runs (it runs first thing in main), and
    // the flag above makes this the only place that takes them.
    Some(fds.map(|fd| unsafe { OwnedFd::from_raw_fd(fd) }).collect())
}

/// Takes ownership of the upgrade's channel passed as `fd`, marking it close-on-exec: a unix socket, or the
/// write end of a pipe when the process being replaced is older (it then passes no connections). `None`
/// unless `fd` is above the listening sockets, open, and one of those.
pub fn take_channel(fd: RawFd, listen_fds: usize) -> Option<OwnedFd> {
    if fd < FIRST + RawFd::try_from(listen_fds).ok()? {
        return None;
    }
    // SAFETY: a zeroed `stat` is a valid value for fstat to overwrite; fstat and fcntl only read or set the
    // flags of a descriptor number, failing on a closed one.
    let is_channel = unsafe {
        let mut st: libc::stat = std::mem::zeroed();
        libc::fstat(fd, &mut st) == 0
            && matches!(st.st_mode & libc::S_IFMT, libc::S_IFIFO | libc::S_IFSOCK)
            && libc::fcntl(fd, libc::F_SETFD, libc::FD_CLOEXEC) == 0
    };
    // SAFETY: open and a pipe or socket (checked above), passed to this process by the anteroom it replaces,
    // named once in a variable that is read once and then removed.
    is_channel.then(|| unsafe { OwnedFd::from_raw_fd(fd) })
}

/// In the child, before exec: `fds[i]` becomes descriptor `3 + i` and stays open across exec; every other
/// descriptor keeps its close-on-exec flag. The parent's copies close when `cmd` is dropped.
pub fn pass_fds(cmd: &mut Command, fds: Vec<OwnedFd>) {
    let sources: Vec<RawFd> = fds.iter().map(AsRawFd::as_raw_fd).collect();
    // Allocated here, before fork: the closure must not allocate.
    let mut moved = sources.clone();
    let n = RawFd::try_from(fds.len()).unwrap_or(0);
    // SAFETY: between fork and exec the closure makes only async-signal-safe calls (fcntl, dup2) and
    // allocates nothing; `fds` is moved into it, so every source is open for as long as it exists.
    unsafe {
        cmd.pre_exec(move || {
            let _keep = &fds;
            // First every source out of the way, above the target range: dup2 onto 3 + i must not close a
            // source still to be placed. These copies are close-on-exec and vanish at exec.
            for (src, tmp) in sources.iter().zip(moved.iter_mut()) {
                *tmp = libc::fcntl(*src, libc::F_DUPFD_CLOEXEC, FIRST + n);
                if *tmp < 0 {
                    return Err(io::Error::last_os_error());
                }
            }
            // dup2 leaves the new descriptor without close-on-exec: exactly what is passed.
            for (i, tmp) in moved.iter().enumerate() {
                if libc::dup2(*tmp, FIRST + i as RawFd) < 0 {
                    return Err(io::Error::last_os_error());
                }
            }
            Ok(())
        });
    }
}

/// Sends one message of `payload` carrying `fd` on the unix socket `sock`, without waiting (`WouldBlock`
/// when its buffer is full). The receiver gets its own descriptor of the same open socket; ours may close
/// as soon as this returns.
pub fn send_with_fd(sock: BorrowedFd<'_>, payload: &[u8], fd: BorrowedFd<'_>) -> io::Result<()> {
    use rustix::net::{SendAncillaryBuffer, SendAncillaryMessage, SendFlags};
    let mut space = [std::mem::MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(1))];
    let mut control = SendAncillaryBuffer::new(&mut space);
    let fds = [fd];
    control.push(SendAncillaryMessage::ScmRights(&fds));
    let flags = SendFlags::DONTWAIT | SendFlags::NOSIGNAL;
    rustix::net::sendmsg(sock, &[io::IoSlice::new(payload)], &mut control, flags)?;
    Ok(())
}

/// Receives one message into `buf` from the unix socket `sock`, without waiting: its length and the
/// descriptor it carried (close-on-exec), if any. Length 0 without a descriptor is the end: the sender
/// closed its side.
pub fn recv_with_fd(sock: BorrowedFd<'_>, buf: &mut [u8]) -> io::Result<(usize, Option<OwnedFd>)> {
    use rustix::net::{RecvAncillaryBuffer, RecvAncillaryMessage, RecvFlags};
    let mut space = [std::mem::MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(1))];
    let mut control = RecvAncillaryBuffer::new(&mut space);
    let flags = RecvFlags::DONTWAIT | RecvFlags::CMSG_CLOEXEC;
    let got = rustix::net::recvmsg(sock, &mut [io::IoSliceMut::new(buf)], &mut control, flags)?;
    let mut fd = None;
    for msg in control.drain() {
        if let RecvAncillaryMessage::ScmRights(fds) = msg {
            // One per message is sent; any more would be a stranger's, and close as they drop.
            for f in fds {
                fd.get_or_insert(f);
            }
        }
    }
    Ok((got.bytes, fd))
}
